"""Lightning wrappers: ``trainer.predict`` runs ZeroKey (Gong et al., arXiv:2412.06292) over a dataset,
on one or many GPUs.

The module holds no parameters; ``predict_step`` just runs :class:`ZeroKeyPipeline` on each shape of
the batch. Multi-GPU prediction is the same Trainer with ``devices: N`` / ``strategy: ddp``: Lightning
shards the dataset with a distributed sampler and every rank's :class:`KeypointJSONWriter` writes its
own shapes. Namer and pointer are ``class_path`` / ``init_args`` objects in the config.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from zerokey.cluster import ClusterConfig
from zerokey.data import FileShapeDataset, KeypointNetDataset, ShapeSample, collate_shapes
from zerokey.mllm.client import BudgetExceeded, CallBudget, ChatError
from zerokey.mllm.namers import Namer
from zerokey.mllm.pointers import Pointer
from zerokey.pipeline import KeypointDetector, ShapePrediction, ZeroKeyPipeline, failed_prediction
from zerokey.views import ViewConfig
from zerokey.writer import ZeroKeyRunError

__all__ = ["ZeroKeyModule", "ZeroKeyDataModule"]

log = logging.getLogger(__name__)


class ZeroKeyModule(pl.LightningModule):
    """Zero-shot 3D keypoints as a prediction loop (ZeroKey, Gong et al., arXiv:2412.06292).

    Defaults are the paper's: 26 views, Gaussian soft voting over an h x h patch, HDBSCAN with
    minPts k = 10 counted in points, the densest cluster's centroid. Our variants are options
    (``docs/fidelity.md``).

    Args:
        namer: a :class:`zerokey.mllm.namers.Namer` (``OpenAINamer``, ``KeypointNetNamer``, ``StaticNamer``).
        pointer: a :class:`zerokey.mllm.pointers.Pointer` (``MolmoPointer``, ``OpenAIPointer``,
            ``OraclePointer``).
        detector: instead of namer + pointer, any :class:`zerokey.pipeline.KeypointDetector` with its
            own settings (e.g. the PatchAlign3D-feature detectors of :mod:`zerokey.features.pipeline`:
            ``configs/keypoints/{zeroshot,fewshot,unified}.yaml``). The writer, run folders, failure
            budget and evaluation are the same; the ZeroKey settings below must then be left unset.
        views: cameras and renderers (:class:`zerokey.views.ViewConfig`: 6 / 26 (paper) / 46 views,
            image size, distance, backends); ``views:`` in a config, ``--model.views.n_views 6``.
        cluster: HDBSCAN and cluster choice (:class:`zerokey.cluster.ClusterConfig`: minPts 10,
            densest cluster, the paper's; our options off).
        patch_size: h of the Gaussian patch lifted around every 2D point.
        voting: "gaussian" (paper) or "binary" (ablation: uniform patch weights), or "disc" (the
            authors' code: summed uint8 Gaussian discs of ``disc_radius`` px, every disc pixel lifted).
        disc_radius: disc radius in render pixels for ``voting="disc"`` (original: 15 at 1024 px).
        lift_method: "auto" | "barycentric" | "points" | "depth".
        keep_all_clusters: write every cluster per name in the JSON, not just the chosen keypoints.
        snap: "surface" (closest mesh point / nearest cloud point) or "none".
        max_failed_call_fraction: the MLLM failure budget (:class:`zerokey.mllm.client.CallBudget`): the
            run stops once more than this fraction of its calls failed (counted over at least 100
            calls), and a run that ends over it (at least one failed call tolerated) is failed;
            1 disables it.

    A shape whose prediction raises (an input the detector cannot handle, out of memory) is written as
    a failed shape with the error, counted and listed; the other shapes still run. Errors that stop
    the run (:class:`zerokey.writer.ZeroKeyRunError`, the failure budget) are not caught.
    """

    def __init__(
        self,
        namer: Namer | None = None,
        pointer: Pointer | None = None,
        detector: KeypointDetector | None = None,
        views: ViewConfig | None = None,
        cluster: ClusterConfig | None = None,
        patch_size: int = 5,
        voting: Literal["gaussian", "binary", "disc"] = "gaussian",
        disc_radius: float = 15.0,
        lift_method: Literal["auto", "barycentric", "points", "depth"] = "auto",
        keep_all_clusters: bool = True,
        snap: Literal["surface", "none"] = "surface",
        max_failed_call_fraction: float = 0.02,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["namer", "pointer", "detector"])
        if detector is not None:
            if namer is not None or pointer is not None:
                raise ValueError(
                    "give either namer + pointer (ZeroKey) or detector (its own namer / pointer), not both"
                )
            if views is not None or cluster is not None:
                raise ValueError(
                    "model.views / model.cluster configure ZeroKey's own pipeline; a detector takes its "
                    "own (e.g. model.detector.init_args.views)"
                )
            self.pipeline: KeypointDetector = detector
        elif namer is None or pointer is None:
            raise ValueError("ZeroKey needs a namer and a pointer (or a detector)")
        else:
            self.pipeline = ZeroKeyPipeline(
                namer,
                pointer,
                views,
                patch_size=patch_size,
                lift_method=lift_method,
                cluster=cluster,
                keep_all_clusters=keep_all_clusters,
                snap=snap,
                voting=voting,
                disc_radius=disc_radius,
            )
        self._attach_budget(max_failed_call_fraction)

    def _attach_budget(self, max_failed_call_fraction: float) -> None:
        #: the run's MLLM failure budget, shared by namer and pointer.
        self.budget = CallBudget(max_failed_call_fraction)
        for _, part in self._parts():
            part.attach_budget(self.budget)
        #: set by KeypointJSONWriter when PNGs are requested: keep renders in the predictions.
        self.keep_debug = False
        #: set by KeypointJSONWriter on resume: shapes already complete in this run folder.
        self.done_ids: set[str] = set()

    def _parts(self) -> list[tuple[str, Any]]:
        """The pipeline's namer and pointer, where it has them."""
        return [
            (role, part)
            for role, part in (("namer", self.pipeline.namer), ("pointer", self.pipeline.pointer))
            if part is not None
        ]

    # -------------------------------------------------------------- interface used by the writer
    def method_settings(self) -> dict[str, Any]:
        """Everything that determines a shape's result (hashed into the run's config hash)."""
        return {"module": self.pipeline.settings()} | {role: part.settings() for role, part in self._parts()}

    def preflight(self) -> None:
        """Check namer and pointer (one cheap server request each) before the first shape."""
        try:
            self.pipeline.check()
        except (OSError, ValueError) as err:
            raise ZeroKeyRunError(f"detector {type(self.pipeline).__name__} is not usable: {err}") from err
        for role, part in self._parts():
            try:
                part.check()
            except (ChatError, OSError) as err:
                raise ZeroKeyRunError(f"{role} {type(part).__name__} is not usable: {err}") from err

    def run_notes(self) -> list[str]:
        """What the user must know about this run's results (printed at the end of predict)."""
        notes = []
        pointer, namer = self.pipeline.pointer, self.pipeline.namer
        if pointer is not None and pointer.is_oracle:
            notes.append(
                "the pointer was OraclePointer (projected ground truth + noise): this evaluates the 3D "
                "half of ZeroKey, not zero-shot keypoint detection"
            )
        if namer is not None and namer.protocol is not None:
            notes.append(
                f"{namer.protocol}: names are the labels of the semantic ids annotated on each shape "
                f"({type(namer).__name__}) as in the authors' KeypointNet numbers, not zero-shot naming"
            )
        elif namer is not None and namer.is_ground_truth:
            notes.append("names came from the benchmark's annotation (KeypointNetNamer), not from an MLLM")
        return notes

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Shapes are dataclasses with strings and optional tensors; move them explicitly.
        return [s.to(device) if isinstance(s, ShapeSample) else s for s in batch]

    def predict_step(
        self, batch: list[ShapeSample], batch_idx: int, dataloader_idx: int = 0
    ) -> list[ShapePrediction]:
        out = []
        for shape in batch:
            if shape.shape_id in self.done_ids:
                out.append(ShapePrediction({"shape_id": shape.shape_id, "status": "skipped"}))
                continue
            try:
                out.append(self.pipeline.predict(shape, self.device, keep_debug=self.keep_debug))
            except (ZeroKeyRunError, BudgetExceeded):
                raise
            except Exception as err:  # noqa: BLE001 - one shape's failure is recorded, the run goes on
                error = f"{type(err).__name__}: {err}"
                log.warning("shape %s failed: %s", shape.shape_id, error)
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                out.append(failed_prediction(shape, error))
        return out


class ZeroKeyDataModule(pl.LightningDataModule):
    """Shapes to predict: files (``inputs``: files, folders or globs) or a KeypointNet root.

    Args:
        inputs: mesh / point-cloud files, folders or glob patterns.
        category / names: category and keypoint names for every file in ``inputs`` (optional; names
            are used by ``StaticNamer``).
        keypointnet_root: read KeypointNet instead (annotations + pcds (+ meshes)); with
            ``categories`` / ``split`` / ``model_ids`` / ``use_mesh`` / ``limit`` as in
            :class:`zerokey.data.KeypointNetDataset`.
        batch_size: shapes per ``predict_step`` (work inside is per shape; >1 only amortises overhead).
        num_workers: DataLoader workers loading / normalising files.
    """

    def __init__(
        self,
        inputs: list[str] | None = None,
        category: str | None = None,
        names: list[str] | None = None,
        keypointnet_root: str | None = None,
        categories: list[str] | None = None,
        split: str | None = None,
        model_ids: list[str] | None = None,
        use_mesh: bool = True,
        limit: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (inputs is None) == (keypointnet_root is None):
            raise ValueError("give exactly one of `inputs` (files) or `keypointnet_root`")
        self.inputs, self.category, self.names = inputs, category, names
        self.keypointnet_root, self.categories, self.split = keypointnet_root, categories, split
        self.model_ids, self.use_mesh, self.limit = model_ids, use_mesh, limit
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        try:
            if self.inputs is not None:
                self.dataset = FileShapeDataset(self.inputs, self.category, self.names)
            else:
                self.dataset = KeypointNetDataset(
                    self.keypointnet_root,
                    self.categories,
                    self.split,
                    self.model_ids,
                    self.use_mesh,
                    limit=self.limit,
                )
        except (FileNotFoundError, ValueError) as err:  # no shape to predict: one line, not a traceback
            raise ZeroKeyRunError(f"data: {err}") from err

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_shapes,
            persistent_workers=False,
        )
