"""Keypoint detectors built on PatchAlign3D's dense features, with ZeroKey's interface and JSONs.

PatchAlign3D: Hadgi et al., arXiv:2601.02457 (dickoah/PatchAlign3D); ZeroKey: arXiv:2412.06292.

Three detectors, each a drop-in for :class:`zerokey.pipeline.ZeroKeyPipeline` (``predict(shape,
device, keep_debug) -> ShapePrediction``), so the same Lightning prediction loop, writer and
``python -m zerokey evaluate`` serve them:

* :class:`ZeroShotFeatureKeypoints` -- names from any ZeroKey namer, one encoder forward pass, the
  peaks of each name's text-similarity field (:func:`zerokey.features.keypoints.peak_keypoints`). No MLLM
  pointing at all. The talk reports 32.88 IoU@0.10 on KeypointNet for this use.
* :class:`FewShotFeatureKeypoints` -- prototypes from ``shots`` annotated support shapes (KeypointNet
  train split by default), matched on the query (:func:`zerokey.features.keypoints.match_prototypes`).
  The talk: 64.07 IoU@0.10.
* :class:`UnifiedKeypoints` (beyond the talk: its "unified sparse + dense" challenge) -- PatchAlign3D
  proposes candidates per name; the MLLM pointer is asked only in the ``views_per_name`` views where
  those candidates are visible (instead of all 26), and weighted HDBSCAN runs on the union of the
  lifted 2D answers and the feature candidates. Each record counts its pointer calls, so the saving
  over full ZeroKey (26 views x names) is measured, not claimed.

Coordinates: the encoder sees the shape in ZeroKey's normalised frame (unit sphere); radii are in
that frame; records carry ``xyz`` in the input file's frame like ZeroKey's.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patchalign.geometry import sample_surface
from zerokey.cluster import ClusterConfig
from zerokey.data import KEYPOINTNET_CLASSES, ShapeSample, load_keypointnet_annotations, load_shape
from zerokey.features.keypoints import (
    KeypointPrototypes,
    build_prototypes,
    interpolate_patch_values,
    match_prototypes,
    name_probabilities,
    peak_keypoints,
)
from zerokey.lift import Candidates3D
from zerokey.mllm.namers import KeypointNetNamer, Namer, StaticNamer
from zerokey.mllm.parsing import ParseStats
from zerokey.mllm.pointers import Pointer, Points2D
from zerokey.pipeline import (
    KeypointDetector,
    ShapePrediction,
    StageTimer,
    ZeroKeyPipeline,
    base_record,
    failed_prediction,
    naming_error,
)
from zerokey.views import RenderedViews, ViewConfig, project_visible, render_shape

__all__ = [
    "DenseFeatures",
    "FeatureModel",
    "ZeroShotFeatureKeypoints",
    "FewShotFeatureKeypoints",
    "NoSupportError",
    "UnifiedKeypoints",
    "surface_points",
    "visible_views",
]

log = logging.getLogger(__name__)

_NAMERS_WITHOUT_IMAGES = (KeypointNetNamer, StaticNamer)


class NoSupportError(ValueError):
    """A few-shot query's class has no support shape: the class is refused, not guessed."""


def _require_positive(**values: float) -> None:
    """One clear line for a radius / count that must be > 0 (instead of an empty or NaN result later)."""
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(f"must be > 0: {', '.join(f'{k}={v!r}' for k, v in bad.items())}")


def surface_points(shape: ShapeSample, n: int, seed: int = 0) -> Tensor:
    """The cloud the encoder sees: the shape's own points, or ``n`` area-weighted samples of its mesh
    (:func:`patchalign.geometry.sample_surface`, the project's one surface sampler)."""
    if not shape.is_mesh:
        return shape.vertices
    return sample_surface(shape.vertices, shape.faces, n, seed).points.to(shape.vertices)


class DenseFeatures:
    """Per-shape encoder output carried to the points: ``points (N,3)``, ``patch_features (G,D)``,
    ``centers (G,3)`` and ``point_features (N,D)`` (inverse-distance interpolation, k nearest centres)."""

    def __init__(self, points: Tensor, patch_features: Tensor, centers: Tensor, interp_k: int) -> None:
        self.points, self.patch_features, self.centers = points, patch_features, centers
        self.interp_k = interp_k
        self._point_features: Tensor | None = None

    @property
    def point_features(self) -> Tensor:
        if self._point_features is None:
            self._point_features = interpolate_patch_values(
                self.points, self.centers, self.patch_features, self.interp_k
            )
        return self._point_features

    def name_scores(self, text: Tensor, logit_scale: float, mode: str) -> Tensor:
        """``(N, K)`` per-point score of each name (patch scores interpolated to the points)."""
        patch = name_probabilities(self.patch_features, text, logit_scale, mode)
        return interpolate_patch_values(self.points, self.centers, patch, self.interp_k)


class FeatureModel:
    """A PatchAlign3D model for keypoints: an export directory or a released checkpoint, loaded
    lazily through :func:`patchalign.load_pretrained` (the same path every downstream user takes)."""

    def __init__(self, path: str, interp_k: int = 3) -> None:
        self.path, self.interp_k = path, interp_k
        self._model: Any = None

    def model(self, device: torch.device) -> Any:
        if self._model is None:
            from patchalign.pretrained import load_pretrained

            if not Path(self.path).exists():
                raise FileNotFoundError(f"PatchAlign3D model {self.path} not found (an export dir or .pt)")
            self._model = load_pretrained(self.path, device=device)
        elif self._model.device != device:
            self._model = self._model.to(device)
        return self._model

    def settings(self) -> dict[str, Any]:
        path = Path(self.path)
        weights = path / "model.safetensors" if path.is_dir() else path
        stat = weights.stat() if weights.exists() else None
        # the file's size and mtime stand in for its content (hashing 90 MB per run is not worth it)
        return {
            "path": str(path.resolve()),
            "size": stat and stat.st_size,
            "mtime": stat and stat.st_mtime,
            "interp_k": self.interp_k,
        }

    def dense(self, points: Tensor, device: torch.device) -> DenseFeatures:
        model = self.model(device)
        out = model.encode(points.to(device), normalize=True)
        return DenseFeatures(
            points.to(device).float(), out.patch_features[0].float(), out.centers[0].float(), self.interp_k
        )


def _keypoint_entry(
    name: str, instance: int, xyz: Tensor, shape: ShapeSample, support: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "instance": instance,
        "xyz": [round(float(c), 6) for c in shape.to_original(xyz)],
        "xyz_normalized": [round(float(c), 6) for c in xyz],
        "support": support,
    }


class _FeatureDetector(KeypointDetector):
    """The frame every detector here shares: the record header, input failures, stage timings.

    Subclasses implement :meth:`_predict` on a readable shape already on ``device`` and return the
    record's own fields; ``predict`` merges them into the header and adds the timings.
    """

    def predict(
        self, shape: ShapeSample, device: torch.device | str = "cpu", keep_debug: bool = False
    ) -> ShapePrediction:
        device = torch.device(device)
        if shape.error is not None:
            return failed_prediction(shape, shape.error)
        record = base_record(shape)
        timer = StageTimer(device)
        pred = self._predict(shape.to(device), device, timer, keep_debug)
        pred.record = record | pred.record | {"timings": timer.total(), "cpu_seconds": timer.cpu_seconds}
        pred.timings = timer.timings
        return pred

    @abstractmethod
    def _predict(
        self, shape: ShapeSample, device: torch.device, timer: StageTimer, keep_debug: bool
    ) -> ShapePrediction: ...


class ZeroShotFeatureKeypoints(_FeatureDetector):
    """Zero-shot keypoints from text: the peaks of each name's similarity field.

    Args:
        model: export directory or released checkpoint of PatchAlign3D.
        namer: where the names come from (any ZeroKey namer; ``KeypointNetNamer`` reads the dataset's
            names, ``OpenAINamer`` asks an MLLM from rendered views, which are then rendered).
        score: ``softmax`` over the queried names (default: a name peaks where it beats the others)
            or raw ``cosine``.
        region_radius / nms_radius / min_score / graph_k: see
            :func:`zerokey.features.keypoints.peak_keypoints`.
        num_points: mesh inputs are sampled to this many points (point clouds are used as they are).
        views: rendering settings, used only when the namer needs images.
    """

    def __init__(
        self,
        model: str,
        namer: Namer,
        score: Literal["softmax", "cosine"] = "softmax",
        interp_k: int = 3,
        region_radius: float = 0.05,
        nms_radius: float = 0.2,
        min_score: float | None = None,
        graph_k: int = 10,
        num_points: int = 2048,
        views: ViewConfig | None = None,
    ) -> None:
        _require_positive(interp_k=interp_k, region_radius=region_radius, nms_radius=nms_radius)
        _require_positive(graph_k=graph_k, num_points=num_points)
        if score not in ("softmax", "cosine"):
            raise ValueError(f"score must be 'softmax' or 'cosine', got {score!r}")
        self.features = FeatureModel(model, interp_k)
        self.namer, self.score = namer, score
        self.region_radius, self.nms_radius, self.min_score, self.graph_k = (
            region_radius,
            nms_radius,
            min_score,
            graph_k,
        )
        self.num_points = num_points
        self.view_config = views or ViewConfig()
        self.pointer = None  # no MLLM pointing (the writer and summaries look for one)
        self._text_cache: dict[tuple, Tensor] = {}

    def text(self, names: list[str], category: str | None, device: torch.device) -> Tensor:
        """Name embeddings, memoised per (names, category): a category's names recur on every shape."""
        key = (tuple(names), category, str(device))
        if key not in self._text_cache:
            model = self.features.model(device)
            self._text_cache[key] = model.text_embeddings(names, category=category).to(device)
        return self._text_cache[key]

    def settings(self) -> dict[str, Any]:
        return super().settings() | {
            "model": self.features.settings(),
            "score": self.score,
            "region_radius": self.region_radius,
            "nms_radius": self.nms_radius,
            "min_score": self.min_score,
            "graph_k": self.graph_k,
            "num_points": self.num_points,
        }

    def check(self) -> None:
        self.features.model(torch.device("cpu"))  # the weights load (strictly) before the first shape

    def _names(self, shape: ShapeSample, device: torch.device) -> Any:
        if isinstance(self.namer, _NAMERS_WITHOUT_IMAGES):
            return self.namer(shape, torch.zeros(0, 1, 1, 3, device=device))
        views = render_shape(shape, self.cameras(device, shape), self.view_config)
        return self.namer.name_views(shape, views)

    def _predict(
        self, shape: ShapeSample, device: torch.device, timer: StageTimer, keep_debug: bool
    ) -> ShapePrediction:
        with timer("name"):
            naming = self._names(shape, device)
        names, instances = naming.names, naming.instances
        naming.error = naming_error(self.namer, naming)
        keypoints: list[dict[str, Any]] = []
        missing = list(names)
        with timer("encode"):
            dense = self.features.dense(surface_points(shape, self.num_points), device)
        if names:
            with timer("peaks"):
                model = self.features.model(device)
                text = self.text(names, shape.category, device)
                scores = dense.name_scores(text, model.logit_scale_value, self.score)
                peaks = peak_keypoints(
                    dense.points,
                    scores,
                    instances,
                    self.region_radius,
                    self.nms_radius,
                    self.min_score,
                    self.graph_k,
                )
            found = {p.name_index for p in peaks}
            missing = [n for i, n in enumerate(names) if i not in found]
            for p in peaks:
                keypoints.append(
                    _keypoint_entry(
                        names[p.name_index],
                        p.instance,
                        p.xyz,
                        shape,
                        {"score": round(p.score, 5), "region_points": p.region_size},
                    )
                )
        record = dict(
            status="failed" if naming.error else "complete",
            error=naming.error,
            detector="patchalign_zeroshot",
            names=names,
            instances=instances,
            keypoints=keypoints,
            missing=missing,
            mllm_calls={"namer": naming.calls, "pointer": 0},
            parse_stats={"namer": naming.stats.as_dict()},
            counts={"points": int(dense.points.shape[0]), "patches": int(dense.centers.shape[0])},
        )
        return ShapePrediction(record, shape=shape if keep_debug else None)


class FewShotFeatureKeypoints(_FeatureDetector):
    """Few-shot keypoints: one prototype per semantic id from ``shots`` annotated support shapes.

    Support shapes are KeypointNet models of the query's category, taken in sorted order from
    ``support_split`` (``splits/<split>.txt``; ``None``: every annotated shape with a point cloud),
    or exactly ``support_ids`` when given. ``exclude_query`` drops the query itself from its support
    set (leave-one-out when the support pool is the evaluated set). A semantic id is predicted when
    at least ``min_support_fraction`` of the support shapes annotate it (KeypointNet shapes do not
    all have every keypoint; predicting a rare one everywhere only adds false positives).

    Features are computed on the KeypointNet point clouds themselves, the frame the annotations'
    ``point_index`` refers to.

    **A class without support** (no annotated shape with a point cloud in the pool but the query
    itself) cannot be predicted. ``on_missing_support="refuse"`` (default) writes its shapes with status
    "refused" and the reason (one warning line per class; the writer lists them, ``zerokey evaluate``
    leaves the class out and says so); ``"leave_one_out"`` first falls back to every annotated shape of
    the class found (``support_split: null``), with one warning line, and refuses only if that is empty
    too. The support source used is written in each record (``counts.support_source``).
    """

    def __init__(
        self,
        model: str,
        keypointnet_root: str,
        shots: int = 5,
        support_split: str | None = "train",
        support_ids: list[str] | None = None,
        exclude_query: bool = True,
        min_support_fraction: float = 0.5,
        interp_k: int = 3,
        on_missing_support: Literal["refuse", "leave_one_out"] = "refuse",
    ) -> None:
        if on_missing_support not in ("refuse", "leave_one_out"):
            raise ValueError(
                f"on_missing_support must be 'refuse' or 'leave_one_out', got {on_missing_support!r}"
            )
        self.on_missing_support = on_missing_support
        self._warned: set[str] = set()
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        self.features = FeatureModel(model, interp_k)
        self.root = Path(keypointnet_root)
        if not (self.root / "annotations").is_dir():
            raise FileNotFoundError(f"KeypointNet root {self.root} has no annotations/ folder")
        self.shots, self.support_split, self.support_ids = shots, support_split, support_ids
        self.exclude_query, self.min_support_fraction = exclude_query, min_support_fraction
        self.pointer = None
        self._annotations: dict[tuple[str, str], dict] | None = None
        self._cache: dict[tuple[str, str], Tensor] = {}
        self._names: dict[str, dict[int, str]] | None = None

    def settings(self) -> dict[str, Any]:
        return super().settings() | {
            "model": self.features.settings(),
            "root": str(self.root.resolve()),
            "shots": self.shots,
            "support_split": self.support_split,
            "support_ids": self.support_ids,
            "exclude_query": self.exclude_query,
            "min_support_fraction": self.min_support_fraction,
            "on_missing_support": self.on_missing_support,
        }

    def check(self) -> None:
        self.features.model(torch.device("cpu"))
        self.annotations()

    def annotations(self) -> dict[tuple[str, str], dict]:
        if self._annotations is None:
            self._annotations = load_keypointnet_annotations(
                sorted((self.root / "annotations").glob("*.json"))
            )
        return self._annotations

    def semantic_name(self, class_id: str, sid: int) -> str:
        if self._names is None:
            from zerokey.data import load_semantic_names

            path = self.root / "semantic_names.json"
            self._names = load_semantic_names(path) if path.exists() else {}
        category = KEYPOINTNET_CLASSES.get(class_id, class_id)
        return self._names.get(category, {}).get(sid, f"keypoint {sid}")

    def support_pool(self, class_id: str, split: str | None = "configured") -> list[str]:
        """Model ids of ``class_id`` usable as support, sorted (those with a point cloud on disk), from
        ``split`` (default: the configured ``support_split``; None: every annotated shape)."""
        if self.support_ids is not None:
            return list(self.support_ids)
        split = self.support_split if split == "configured" else split
        allowed = None
        if split is not None:
            split_file = self.root / "splits" / f"{split}.txt"
            if not split_file.exists():
                raise FileNotFoundError(f"support split {split_file} not found")
            allowed = {ln.strip().split("-")[-1] for ln in split_file.read_text().splitlines() if ln.strip()}
        return sorted(
            m
            for c, m in self.annotations()
            if c == class_id
            and (allowed is None or m in allowed)
            and (self.root / "pcds" / c / f"{m}.pcd").exists()
        )

    def _warn_once(self, class_id: str, message: str) -> None:
        if class_id not in self._warned:
            self._warned.add(class_id)
            log.warning("%s", message)

    def _support_set(self, class_id: str, query_model: str | None) -> tuple[list[str], str]:
        """The support model ids for a query and where they came from; :class:`NoSupportError` if none."""
        category = f"{KEYPOINTNET_CLASSES.get(class_id, class_id)} ({class_id})"
        source = "support_ids" if self.support_ids is not None else f"split {self.support_split}"
        pools = [(source, self.support_pool(class_id))]
        if self.on_missing_support == "leave_one_out" and self.support_ids is None and self.support_split:
            pools.append(("every annotated shape (leave-one-out)", None))
        for i, (where, pool) in enumerate(pools):
            pool = self.support_pool(class_id, None) if pool is None else pool
            usable = [m for m in pool if not (self.exclude_query and m == query_model)]
            if usable:
                if i:
                    self._warn_once(
                        class_id, f"few-shot: no support for {category} in {source}; falling back to {where}"
                    )
                return usable[: self.shots], where
        found = len(self.support_pool(class_id, None))
        raise NoSupportError(
            f"few-shot: class {category} refused: no support shape besides the query under {self.root} "
            f"({source}; {found} annotated shape(s) of the class with a point cloud)"
        )

    def _support_features(self, class_id: str, model_id: str, device: torch.device) -> Tensor:
        key = (class_id, model_id)
        if key not in self._cache:
            # the same loader and normalisation as a queried KeypointNet cloud, so a support shape and
            # the same shape as a query see bit-identical inputs
            support = load_shape(self.root / "pcds" / class_id / f"{model_id}.pcd")
            self._cache[key] = self.features.dense(support.vertices, device).point_features.cpu()
        return self._cache[key].to(device)

    def prototypes(self, class_id: str, query_model: str | None, device: torch.device) -> KeypointPrototypes:
        support, _ = self._support_set(class_id, query_model)
        if len(support) < self.shots:
            log.warning(
                "few-shot: only %d of %d support shapes for class %s", len(support), self.shots, class_id
            )
        feats, idx, sids = [], [], []
        for m in support:
            ann = self.annotations()[(class_id, m)]
            pairs = {(int(k["pcd_info"]["point_index"]), int(k["semantic_id"])) for k in ann["keypoints"]}
            pairs = sorted(pairs)  # duplicated annotations count once (as the reference evaluation does)
            feats.append(self._support_features(class_id, m, device))
            idx.append(torch.tensor([p for p, _ in pairs], device=device))
            sids.append(torch.tensor([s for _, s in pairs], device=device))
        return build_prototypes(feats, idx, sids)

    def _predict(
        self, shape: ShapeSample, device: torch.device, timer: StageTimer, keep_debug: bool
    ) -> ShapePrediction:
        if not shape.class_id:
            raise ValueError(f"few-shot keypoints need the shape's KeypointNet class id ({shape.shape_id})")
        with timer("support"):
            try:
                _, source = self._support_set(shape.class_id, shape.model_id)
            except NoSupportError as err:
                self._warn_once(shape.class_id, str(err))
                record = {"status": "refused", "error": str(err), "detector": "patchalign_fewshot"}
                return ShapePrediction(record | {"names": [], "keypoints": [], "missing": []})
            protos = self.prototypes(shape.class_id, shape.model_id, device)
        with timer("encode"):
            points = surface_points(shape, 2048)
            dense = self.features.dense(points, device)
        with timer("match"):
            keep = protos.support.float() >= self.min_support_fraction * protos.n_shapes
            best, sim = match_prototypes(dense.point_features, protos)
        keypoints = []
        for j in torch.nonzero(keep).flatten().tolist():
            sid = int(protos.ids[j])
            keypoints.append(
                _keypoint_entry(
                    self.semantic_name(shape.class_id, sid),
                    0,
                    dense.points[best[j]],
                    shape,
                    {
                        "semantic_id": sid,
                        "similarity": round(float(sim[j]), 5),
                        "support": int(protos.support[j]),
                    },
                )
            )
        record = dict(
            detector="patchalign_fewshot",
            names=[k["name"] for k in keypoints],
            instances=[1] * len(keypoints),
            keypoints=keypoints,
            missing=[],
            mllm_calls={"namer": 0, "pointer": 0},
            counts={
                "support_shapes": protos.n_shapes,
                "support_source": source,
                "prototypes": len(protos.ids),
                "points": len(points),
            },
        )
        return ShapePrediction(record, shape=shape if keep_debug else None)


def visible_views(xyz: Tensor, views: RenderedViews, depth_tolerance: float = 0.03) -> Tensor:
    """``(V, P)`` whether each 3D point is inside each view and not hidden (the oracle's depth test)."""
    return project_visible(xyz, views, depth_tolerance)[1]


def _subset_views(views: RenderedViews, index: Tensor) -> RenderedViews:
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return RenderedViews(
        images=views.images[index],
        cameras=views.cameras[index],
        depth=views.depth[index],
        mask=views.mask[index],
        pix_to_face=pick(views.pix_to_face),
        bary=pick(views.bary),
        pix_to_point=pick(views.pix_to_point),
    )


class UnifiedKeypoints(ZeroKeyPipeline):
    """PatchAlign3D proposes, the MLLM pointer confirms in a few views, weighted HDBSCAN decides.

    Per name: the ``candidates_per_name`` strongest feature peaks (geodesic NMS) are projected into
    the rendered views; the ``views_per_name`` views in which the most candidate score is visible are
    the only ones the pointer is asked about that name. Its answers are lifted with ZeroKey's
    Gaussian patches; the feature peaks' regions join them as 3D candidates of weight
    ``feature_weight x score`` per point (so HDBSCAN sees the feature evidence as one more, weaker,
    view); the densest cluster per name is the keypoint. A name the pointer never finds falls back to
    its strongest feature peak when ``fallback_to_features``.

    ZeroKey's stage sequence (:meth:`zerokey.pipeline.ZeroKeyPipeline.predict`) with its hooks filled
    in: propose (encode + feature peaks), point (the chosen views only), extra candidates (the peaks'
    regions), unclustered names (feature fallback). Pointer calls per shape: ``views_per_name x names``
    instead of full ZeroKey's ``26 x names``.
    """

    def __init__(
        self,
        model: str,
        namer: Namer,
        pointer: Pointer,
        views: ViewConfig | None = None,
        candidates_per_name: int = 3,
        views_per_name: int = 3,
        feature_weight: float = 1.0,
        fallback_to_features: bool = True,
        patch_size: int = 5,
        cluster: ClusterConfig | None = None,
        score: Literal["softmax", "cosine"] = "softmax",
        region_radius: float = 0.05,
        nms_radius: float = 0.2,
        interp_k: int = 3,
        num_points: int = 2048,
    ) -> None:
        _require_positive(candidates_per_name=candidates_per_name, views_per_name=views_per_name)
        _require_positive(feature_weight=feature_weight, patch_size=patch_size)
        super().__init__(namer, pointer, views, patch_size, cluster=cluster, keep_all_clusters=False)
        self.zero_shot = ZeroShotFeatureKeypoints(
            model, namer, score, interp_k, region_radius, nms_radius, None, 10, num_points, views
        )
        self.candidates_per_name, self.views_per_name = candidates_per_name, views_per_name
        self.feature_weight, self.fallback_to_features = feature_weight, fallback_to_features
        self.region_radius = region_radius

    def settings(self) -> dict[str, Any]:
        zs = self.zero_shot
        return super().settings() | {
            "model": zs.features.settings(),
            "candidates_per_name": self.candidates_per_name,
            "views_per_name": self.views_per_name,
            "feature_weight": self.feature_weight,
            "fallback_to_features": self.fallback_to_features,
            "score": zs.score,
            "region_radius": self.region_radius,
            "nms_radius": zs.nms_radius,
        }

    def check(self) -> None:
        self.zero_shot.check()

    def _propose(
        self,
        shape: ShapeSample,
        names: list[str],
        instances: list[int],
        device: torch.device,
        timed: StageTimer,
    ) -> dict[str, Any]:
        feats = self.zero_shot.features
        with timed("encode"):
            dense = feats.dense(surface_points(shape, self.zero_shot.num_points), device)
        with timed("propose"):
            if names:
                text = self.zero_shot.text(names, shape.category, device)
                model = feats.model(device)
                scores = dense.name_scores(text, model.logit_scale_value, self.zero_shot.score)
                per_name = [max(self.candidates_per_name, n) for n in instances]
                peaks = peak_keypoints(
                    dense.points, scores, per_name, self.region_radius, self.zero_shot.nms_radius
                )
            else:
                scores, peaks = torch.zeros(dense.points.shape[0], 0, device=device), []
        return {"dense": dense, "scores": scores, "peaks": peaks, "chosen_views": {}}

    def _point(self, shape: ShapeSample, names: list[str], views: RenderedViews, state: Any) -> Points2D:
        device = views.images.device
        uv, vw, ni, calls, failed, stats = [], [], [], 0, [], ParseStats()
        for i, name in enumerate(names):
            mine = [p for p in state["peaks"] if p.name_index == i]
            if not mine:
                continue
            xyz = torch.stack([p.xyz for p in mine])
            w = torch.tensor([p.score for p in mine], device=device)
            vis = visible_views(xyz, views).float() @ w  # (V,) visible candidate score per view
            order = torch.argsort(-vis, stable=True)[: self.views_per_name]
            order = order[vis[order] > 0]
            if order.numel() == 0:
                continue
            state["chosen_views"][name] = order.tolist()
            answer: Points2D = self.pointer(shape, [name], _subset_views(views, order))
            calls += int(order.numel())  # one (view, name) request each, the paper's unit
            stats += answer.stats
            if answer.error:
                failed.append(f"{name}: {answer.error}")
            uv.append(answer.uv)
            vw.append(order[answer.view])
            ni.append(torch.full_like(answer.name_index, i))
        state["failed"] = failed
        if not uv:
            return Points2D.empty(device)
        error = "; ".join(failed) if failed else None
        return Points2D(torch.cat(uv), torch.cat(vw), torch.cat(ni), stats, calls=calls, error=error)

    def _extra_candidates(self, candidates: Candidates3D, state: Any, views: RenderedViews) -> Candidates3D:
        # feature candidates: each peak's region points, weight feature_weight x score, view id V.
        dense, scores, peaks = state["dense"], state["scores"], state["peaks"]
        device = dense.points.device
        f_xyz, f_w, f_n = [], [], []
        for p in peaks:
            region = (dense.points - p.xyz).norm(dim=-1) <= self.region_radius
            f_xyz.append(dense.points[region])
            f_w.append(self.feature_weight * scores[region, p.name_index].clamp_min(1e-6))
            f_n.append(torch.full((int(region.sum()),), p.name_index, device=device))
        if not f_xyz:
            return candidates
        m = sum(len(x) for x in f_xyz)
        return Candidates3D(
            torch.cat([candidates.xyz, *f_xyz]),
            torch.cat([candidates.weight, *f_w]),
            torch.cat([candidates.name_index, *f_n]),
            torch.cat([candidates.view, torch.full((m,), views.n_views, device=device, dtype=torch.long)]),
            torch.cat([candidates.source, torch.full((m,), -1, device=device, dtype=torch.long)]),
        )

    def _unclustered(
        self, name_index: int, name: str, instances: int, state: Any, shape: ShapeSample
    ) -> list[dict[str, Any]]:
        if not self.fallback_to_features:
            return []
        mine = [p for p in state["peaks"] if p.name_index == name_index][:instances]
        support = lambda p: {"source": "features", "score": round(p.score, 5)}  # noqa: E731
        return [_keypoint_entry(name, j, p.xyz, shape, support(p)) for j, p in enumerate(mine)]

    def _finish_record(
        self, record: dict[str, Any], views: RenderedViews, names: list[str], state: Any
    ) -> None:
        record["mllm_calls"]["pointer_full_zerokey"] = views.n_views * len(names)
        record.update(
            detector="unified", pointer_views=state["chosen_views"], pointer_failures=state.get("failed", [])
        )
