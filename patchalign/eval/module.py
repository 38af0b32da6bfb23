"""The benchmark path of ``python -m patchalign test``: zero-shot part segmentation as a LightningModule.

::

    python -m patchalign test --config configs/eval/shapenetpart.yaml \
        --model.init_args.init_from patchalign3d.pt --data.init_args.root DATA/...

:class:`ZeroShotSegmentation` is :class:`~patchalign.training.modules.Stage2Alignment` (same encoder,
head, logit parameters and ``init_from`` loading, so a Stage 2 ``.ckpt``, an export directory or the
released file all load, strictly) plus the evaluation protocol: part names encoded by the text
encoder the head was aligned to, labels transferred to the points,
:class:`~patchalign.eval.evaluator.PartSegEvaluator` over the
:class:`~patchalign.eval.datamodule.EvalDataModule`'s shapes. It lives here, not in the
training module, because training imports no evaluation code (``tests/test_architecture.py``).

Writes ``<trainer.default_root_dir>/eval/{results.csv,results.json,comparison.csv}`` (the
:class:`~patchalign.eval.callbacks.BestWorstPictures` callback adds ``eval/viz/``); the CLI refuses
a ``default_root_dir`` that already holds them unless ``--overwrite`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException

from patchalign.eval.evaluator import PartSegEvaluator, zero_shot_predict
from patchalign.model import PatchAlignEncoder
from patchalign.pretrained import AssignMode
from patchalign.text import PartTextEmbedder, load_text_encoder
from patchalign.training.modules import Stage2Alignment

#: where, under ``trainer.default_root_dir``, a ``test`` run writes its tables (and ``viz/`` pictures)
RESULTS_DIR = "eval"


class ZeroShotSegmentation(Stage2Alignment):
    """Zero-shot part segmentation of a benchmark split (``test`` only).

    Args:
        encoder: the backbone; its architecture is read from ``init_from`` / ``--ckpt_path`` by
            the CLI, so the config's ``encoder`` block need not match the file by hand.
        init_from: a Stage 2 Lightning checkpoint, an export directory or the released
            ``patchalign3d.pt`` (loaded strictly, head included).
        init_strict: refuse a file whose tensors do not match (default).
        init_head: load the head and the trained temperature too (default; ``false`` only to
            evaluate a fresh head).
        loss, temperature, max_logit_scale: the logit parameters of the Stage 2 run being evaluated
            (set from a Lightning checkpoint's hyper-parameters by the CLI).
        eval_text_encoder: spec of the text encoder the head was aligned to, e.g.
            ``open_clip:ViT-bigG-14@laion2b_s39b_b160k``; default the one the checkpoint records.
        eval_templates: prompt template preset (``part_only`` = the released one).
        eval_assign: patch -> point label transfer (``nearest`` patch centre = the released one).
    """

    def __init__(
        self,
        encoder: PatchAlignEncoder,
        init_from: str | None = None,
        init_strict: bool = True,
        init_head: bool = True,
        loss: Literal["bce", "siglip"] = "bce",
        temperature: Literal["log", "linear"] = "log",
        max_logit_scale: float = 100.0,
        eval_text_encoder: str | None = None,
        eval_templates: str = "part_only",
        eval_assign: AssignMode = "nearest",
    ) -> None:
        super().__init__(
            encoder,
            init_from=init_from,
            init_strict=init_strict,
            init_head=init_head,
            loss=loss,
            temperature=temperature,
            max_logit_scale=max_logit_scale,
        )
        if eval_assign not in ("nearest", "knn", "membership"):
            raise ValueError(f"eval_assign must be nearest, knn or membership, got {eval_assign!r}")
        self.text_encoder_spec = eval_text_encoder
        self.templates = eval_templates
        self.assign: AssignMode = eval_assign
        self._embedder: PartTextEmbedder | None = None
        self.evaluator: PartSegEvaluator | None = None

    def setup(self, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum)
        if stage != "test":  # Lightning's "this run cannot be done": one line from the CLI
            raise MisconfigurationException(
                f"ZeroShotSegmentation evaluates a benchmark with `test`, not `{stage}` "
                "(train and validate with patchalign.training.modules.Stage2Alignment)"
            )
        if getattr(self.trainer.datamodule, "test_dataset", None) is None:
            raise MisconfigurationException(
                "ZeroShotSegmentation needs a benchmark data module "
                "(patchalign.eval.datamodule.EvalDataModule)"
            )

    def embedder(self) -> PartTextEmbedder:
        """The part-name embedder (built once, on first use)."""
        if self._embedder is None:
            spec = self.text_encoder_spec or self.hparams.get("text_encoder")
            if not spec:
                raise ValueError(
                    "zero-shot evaluation needs the text encoder the head was aligned to: set "
                    "model.init_args.eval_text_encoder (e.g. open_clip:ViT-bigG-14@laion2b_s39b_b160k)"
                )
            self._embedder = PartTextEmbedder(load_text_encoder(spec), self.templates)
        return self._embedder

    def results_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / RESULTS_DIR

    def on_test_epoch_start(self) -> None:
        self.evaluator = PartSegEvaluator.from_dataset(self.trainer.datamodule.test_dataset).to(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.evaluator is not None
        pred = zero_shot_predict(self.encoder, batch, self.embedder(), assign=self.assign)
        self.evaluator.update_batch(pred.labels, batch)

    def on_test_epoch_end(self) -> None:
        assert self.evaluator is not None
        report = self.evaluator.compute()
        self.log_dict(report.log_dict("test/"), rank_zero_only=True)
        if self.trainer.is_global_zero:
            csv_path, json_path = report.save(self.results_dir())
            print(report.format_table())
            print(f"per-category results: {csv_path} and {json_path}")
