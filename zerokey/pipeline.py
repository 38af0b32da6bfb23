"""The ZeroKey pipeline for one shape, as plain Python/torch (Lightning only wraps it).

Reproduces ZeroKey (Gong et al., arXiv:2412.06292): render M views -> name keypoints -> point in 2D
per (view, name) -> lift Gaussian patches to the surface -> HDBSCAN per name -> densest cluster(s) ->
weighted centroid snapped to the surface.

Each shape's record has ``status`` "complete" or "failed" (``error`` says why: unreadable input, a
namer without names, MLLM calls that failed). A failed shape is never reported as "0 keypoints found":
the writer lists it in ``failed_shapes`` and a resumed run predicts it again.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from zerokey.cluster import Cluster, ClusterConfig, closest_point_on_mesh, cluster_candidates, nearest_point
from zerokey.data import ShapeSample
from zerokey.lift import Candidates3D, lift_discs, lift_points
from zerokey.mllm.namers import Namer, NamingResult
from zerokey.mllm.parsing import ParseStats
from zerokey.mllm.pointers import Pointer, Points2D
from zerokey.views import RenderedViews, ViewConfig, make_cameras, render_shape, shape_cameras

__all__ = [
    "KeypointDetector",
    "ShapePrediction",
    "StageTimer",
    "ZeroKeyPipeline",
    "base_record",
    "failed_prediction",
    "naming_error",
    "snap_to_surface",
]

log = logging.getLogger(__name__)


@dataclass
class ShapePrediction:
    """Result for one shape: ``record`` is the JSON-serialisable summary written to disk; ``views`` and
    ``points`` are kept only when plots were requested (they are large)."""

    record: dict[str, Any]
    views: RenderedViews | None = None
    points: Points2D | None = None
    shape: ShapeSample | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _round(values: Tensor | list[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in (values.tolist() if isinstance(values, Tensor) else values)]


class StageTimer:
    """Wall and process-CPU seconds per stage (CUDA-synchronised): a record's ``timings`` / ``cpu_seconds``.

    Process CPU time (all threads) is robust to other jobs sharing the machine, unlike wall time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = round(time.perf_counter() - start, 5)
        self.cpu_seconds[stage] = round(time.process_time() - cpu_start, 5)

    def total(self) -> dict[str, float]:
        """``timings`` with their sum added as ``total``."""
        self.timings["total"] = round(sum(self.timings.values()), 5)
        return self.timings


def base_record(shape: ShapeSample) -> dict[str, Any]:
    """The fields every detector's record starts with: ids, source, frame, and the input's status."""
    return {
        "shape_id": shape.shape_id,
        "source": shape.source,
        "category": shape.category,
        "class_id": shape.class_id,
        "model_id": shape.model_id,
        "frame": {"center": _round(shape.center), "scale": float(shape.scale)},
        "status": "failed" if shape.error else "complete",
        "error": shape.error,
    }


def failed_prediction(shape: ShapeSample, error: str, status: str = "failed") -> ShapePrediction:
    """A shape that produced no keypoints, with the reason: counted and listed by the writer, never
    "0 keypoints found"; a resumed run predicts it again."""
    record = base_record(shape) | {"status": status, "error": error, "keypoints": [], "names": []}
    return ShapePrediction(record)


def naming_error(namer: Namer, naming: NamingResult) -> str | None:
    """Why a shape's naming failed: the namer's own error, or that it gave no names at all (a failed
    shape, never "0 keypoints found")."""
    if naming.error is None and not naming.names:
        return f"{type(namer).__name__} gave no names"
    return naming.error


def snap_to_surface(xyz: Tensor, shape: ShapeSample) -> Tensor:
    """Closest point on the mesh surface, or the nearest point of a point cloud."""
    if xyz.numel() == 0:
        return xyz
    if shape.is_mesh:
        return closest_point_on_mesh(xyz, shape.vertices, shape.faces)
    return nearest_point(xyz, shape.vertices)[0]


class KeypointDetector(ABC):
    """What :class:`zerokey.module.ZeroKeyModule` runs on each shape: ``predict(shape, device,
    keep_debug) -> ShapePrediction`` with a record in the format above (``status``, ``error``,
    ``names``, ``keypoints`` with ``xyz`` in the input frame, ``mllm_calls``, ``timings``).

    ``namer`` / ``pointer`` (``None`` when a detector has none) get the run's call budget and
    pre-flight check; ``settings()`` is hashed into the run's config hash (everything that changes a
    result); ``check()`` runs once before the first shape (load weights, fail in one clear line).
    """

    namer: Namer | None = None
    pointer: Pointer | None = None

    @abstractmethod
    def predict(
        self, shape: ShapeSample, device: torch.device | str = "cpu", keep_debug: bool = False
    ) -> ShapePrediction: ...

    view_config: ViewConfig

    def settings(self) -> dict[str, Any]:
        return {"class": f"{type(self).__module__}.{type(self).__name__}"}

    def cameras(self, device: torch.device, shape: ShapeSample | None = None):
        """The ``view_config`` cameras on ``device``, built once per device (per shape for the
        original layout, which looks at each shape's vertex mean)."""
        if self.view_config.layout == "original":
            if shape is None:
                raise ValueError("views.layout 'original' needs the shape to place its cameras")
            return shape_cameras(self.view_config, shape, device)
        cache = self.__dict__.setdefault("_cameras", {})
        key = str(device)
        if key not in cache:
            cache[key] = make_cameras(self.view_config, device)
        return cache[key]

    def check(self) -> None:  # noqa: B027 - optional hook; most detectors have nothing to check
        """Pre-flight check of the detector itself (namer and pointer are checked separately)."""


class ZeroKeyPipeline(KeypointDetector):
    """Zero-shot keypoints for one shape at a time (all work inside is batched over views / pixels).

    Args:
        namer: which names to look for (:mod:`zerokey.mllm.namers`).
        pointer: where they are in each view (:mod:`zerokey.mllm.pointers`).
        views: camera / renderer settings.
        patch_size: h of the Gaussian patch cast to the surface around each 2D point.
        lift_method: "auto" | "barycentric" | "points" | "depth" (see :func:`zerokey.lift.lift_points`).
        cluster: HDBSCAN / selection settings (:class:`zerokey.cluster.ClusterConfig`).
        voting: "gaussian" (paper) or "binary" patch weights (ablation), or "disc" (the authors' code:
            summed, uint8-quantised Gaussian discs of ``disc_radius`` px, :func:`zerokey.lift.lift_discs`;
            ``patch_size`` and ``lift_method`` unused).
        disc_radius: radius in render pixels of ``voting="disc"`` (15 at 1024 px in the original).
        keep_all_clusters: also write every cluster per name (not only the chosen keypoints).
        snap: "surface" snaps centroids to the closest mesh surface point / nearest cloud point;
            "none" keeps the raw weighted centroid.
    """

    def __init__(
        self,
        namer: Namer,
        pointer: Pointer,
        views: ViewConfig | None = None,
        patch_size: int = 5,
        lift_method: Literal["auto", "barycentric", "points", "depth"] = "auto",
        cluster: ClusterConfig | None = None,
        keep_all_clusters: bool = True,
        snap: Literal["surface", "none"] = "surface",
        voting: Literal["gaussian", "binary", "disc"] = "gaussian",
        disc_radius: float = 15.0,
    ) -> None:
        if voting not in ("gaussian", "binary", "disc"):
            raise ValueError(f"voting must be 'gaussian', 'binary' or 'disc', got {voting!r}")
        if disc_radius <= 0:
            raise ValueError(f"disc_radius must be > 0, got {disc_radius}")
        self.disc_radius = disc_radius
        self.namer, self.pointer = namer, pointer
        self.voting = voting
        self.view_config = views or ViewConfig()
        self.patch_size, self.lift_method = patch_size, lift_method
        self.cluster_config = cluster or ClusterConfig()
        self.keep_all_clusters, self.snap = keep_all_clusters, snap

    def settings(self) -> dict[str, Any]:
        return super().settings() | {
            "views": asdict(self.view_config),
            "cluster": asdict(self.cluster_config),
            "patch_size": self.patch_size,
            "lift_method": self.lift_method,
            "voting": self.voting,
            "disc_radius": self.disc_radius,
            "keep_all_clusters": self.keep_all_clusters,
            "snap": self.snap,
        }

    def _snap(self, xyz: Tensor, shape: ShapeSample) -> Tensor:
        return xyz if self.snap == "none" else snap_to_surface(xyz, shape)

    def _cluster_record(self, cluster: Cluster, snapped: Tensor, shape: ShapeSample) -> dict[str, Any]:
        return {
            "xyz": _round(shape.to_original(snapped)),
            "xyz_normalized": _round(snapped),
            "centroid_normalized": _round(cluster.centroid),
            # How well the cluster is supported: total Gaussian weight, 3D candidates, distinct views,
            # and weighted RMS distance of its candidates to the centroid (normalised units).
            "support": {
                "weight": round(cluster.weight, 4),
                "candidates": cluster.size,
                "views": cluster.n_views,
                "spread": round(cluster.spread, 6),
                "density": round(cluster.density, 4),
                "source": "cluster",
            },
        }

    def predict(
        self,
        shape: ShapeSample,
        device: torch.device | str = "cpu",
        keep_debug: bool = False,
        views: RenderedViews | None = None,
        points: Points2D | None = None,
    ) -> ShapePrediction:
        """Run every stage on one shape; failures of the input are recorded, not raised.

        ``views`` / ``points`` reuse renders / 2D detections made earlier for this shape with the
        same view layout (the bench runs several lifting / clustering ablations on one set of
        answers); ``points`` must then match the names this pipeline's namer gives.

        The stage sequence is shared with detectors built on this one (the unified detector of
        :mod:`zerokey.features.pipeline`) through four hooks: :meth:`_propose` (before pointing),
        :meth:`_point`, :meth:`_extra_candidates` (after lifting) and :meth:`_unclustered` (a name
        without a cluster), plus :meth:`_finish_record`.
        """
        device = torch.device(device)
        if shape.error is not None:
            return failed_prediction(shape, shape.error)
        record = base_record(shape)
        timed = StageTimer(device)
        shape = shape.to(device)
        with timed("render"):
            if views is None:
                views = render_shape(shape, self.cameras(device, shape), self.view_config)
        with timed("name"):
            naming = self.namer.name_views(shape, views)
        names, instances = naming.names, naming.instances
        naming.error = naming_error(self.namer, naming)
        state = self._propose(shape, names, instances, device, timed)
        with timed("point"):
            if points is None:
                points = self._point(shape, names, views, state) if names else Points2D.empty(device)
        with timed("lift"):
            if self.voting == "disc":
                candidates = lift_discs(points.uv, points.view, points.name_index, views, self.disc_radius)
            else:
                candidates = lift_points(
                    points.uv,
                    points.view,
                    points.name_index,
                    views,
                    shape.vertices,
                    shape.faces,
                    patch_size=self.patch_size,
                    method=self.lift_method,
                    voting=self.voting,
                )
            candidates = self._extra_candidates(candidates, state, views)
        with timed("cluster"):
            per_name = cluster_candidates(candidates, len(names), self.cluster_config)
            if self.cluster_config.method in ("original", "raw_mean", "binary"):
                chosen = per_name  # every kept cluster is a keypoint of the name (several per name)
            else:
                chosen = [clusters[: instances[i]] for i, clusters in enumerate(per_name)]
            kept = per_name if self.keep_all_clusters else chosen
            all_clusters = [c for clusters in kept for c in clusters]
            centroids = torch.stack([c.centroid for c in all_clusters]) if all_clusters else torch.zeros(0, 3)
            snapped = self._snap(centroids.to(device), shape)
            snapped_of = {id(c): snapped[j] for j, c in enumerate(all_clusters)}
        timings, cpu_seconds = timed.total(), timed.cpu_seconds

        keypoints, missing = [], []
        for i, name in enumerate(names):
            found = [
                {"name": name, "instance": k} | self._cluster_record(c, snapped_of[id(c)], shape)
                for k, c in enumerate(chosen[i])
            ]
            found = found or self._unclustered(i, name, instances[i], state, shape)
            keypoints += found
            if not found:
                missing.append(name)
        error = naming.error or points.error
        record.update(
            status="failed" if error else "complete",
            error=error,
            names=names,
            instances=instances,
            keypoints=keypoints,
            missing=missing,
            mllm_calls={"namer": naming.calls, "pointer": points.calls},
            failed_calls={"namer": naming.stats.failed_calls, "pointer": points.stats.failed_calls},
            parse_stats={"namer": naming.stats.as_dict(), "pointer": points.stats.as_dict()},
            counts={"views": views.n_views, "points2d": len(points), "candidates": len(candidates)},
            timings=timings,
            cpu_seconds=cpu_seconds,
        )
        if naming.details:
            record["naming_details"] = naming.details
        self._finish_record(record, views, names, state)
        if self.keep_all_clusters:
            record["clusters"] = {
                names[i]: [self._cluster_record(c, snapped_of[id(c)], shape) for c in clusters]
                for i, clusters in enumerate(per_name)
            }
        if keep_debug:
            return ShapePrediction(record, views, points, shape, timings)
        return ShapePrediction(record, timings=timings)

    # ---------------------------------------------------------------- hooks (no-ops for ZeroKey)
    def _propose(
        self,
        shape: ShapeSample,
        names: list[str],
        instances: list[int],
        device: torch.device,
        timed: StageTimer,
    ) -> Any:
        """Work between naming and pointing; its result is passed to the other hooks."""
        return None

    def _point(self, shape: ShapeSample, names: list[str], views: RenderedViews, state: Any) -> Points2D:
        """2D points per (view, name): ZeroKey asks the pointer in every view."""
        return self.pointer(shape, names, views)

    def _extra_candidates(self, candidates: Candidates3D, state: Any, views: RenderedViews) -> Candidates3D:
        """3D candidates joining the lifted ones before clustering."""
        return candidates

    def _unclustered(
        self, name_index: int, name: str, instances: int, state: Any, shape: ShapeSample
    ) -> list[dict[str, Any]]:
        """Keypoints for a name no cluster was found for (ZeroKey: none, the name is missing)."""
        return []

    def _finish_record(
        self, record: dict[str, Any], views: RenderedViews, names: list[str], state: Any
    ) -> None:
        """Add detector-specific fields to the shape's record (in place)."""

    def render(self, shape: ShapeSample, device: torch.device | str = "cpu") -> RenderedViews:
        """Only the render stage (for reuse through ``predict(views=...)``)."""
        device = torch.device(device)
        shape = shape.to(device)
        return render_shape(shape, self.cameras(device, shape), self.view_config)


def merge_parse_stats(records: list[dict[str, Any]], key: str) -> dict[str, int]:
    """Sum the ``parse_stats[key]`` counters over shape records (for run summaries)."""
    total = ParseStats()
    for r in records:
        stats = (r.get("parse_stats") or {}).get(key)
        if stats:
            total += ParseStats.from_dict(stats)
    return total.as_dict()
