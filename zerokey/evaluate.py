"""KeypointNet keypoint-saliency evaluation (mIoU over geodesic thresholds), as the reference code does it.

Follows qq456cvb/KeypointNet@33dd3874e285896fda97e4a2775b5903ea39d772 ``benchmark_scripts``
(``metrics.eval_det_cls_iou``, ``utils.gen_geo_dists``, ``test.py``, ``dataset.py``):

* each prediction is snapped to the nearest of the shape's 2048 pcd points (the reference predicts
  per pcd point, so predictions *are* pcd indices);
* geodesic distance = shortest path on the pcd's k = 20 nearest-neighbour graph with Euclidean edge
  lengths (``kneighbors_graph(pc, 20, mode='distance', include_self=False)``), treated as undirected
  (an edge exists if either point is among the other's 20 neighbours); raw pcd coordinates
  (``normalize_pc: False`` in their config);
* per shape, a GT keypoint is *found* if some prediction is within the threshold (``not all(d > t)``);
  a prediction is *false* if no GT keypoint is within the threshold (``all(d > t)``);
* per class, ``IoU = (#GT - #missed) / (#GT + #false)`` with counts summed over the class's shapes
  (micro average), for thresholds 0.00, 0.01, ..., 0.10.

* **GT keypoints are a set.** The reference marks GT as a binary per-point label
  (``bin_label[label] = 1`` in ``dataset.KeypointSaliencyDataset``) and reads it back with
  ``np.where(label == 1)``, so a point index annotated twice counts once; we de-duplicate the indices
  the same way (6 of the 999 chair annotations repeat an index);
* **the test split.** The reference scores the models of ``splits/test.txt`` (``--split test``);
  without ``--split`` every annotated shape found is scored, and the output says so.

Two details of the reference made explicit:

* **Zero-length edges.** sklearn's old ``graph_shortest_path`` densified the graph and treated 0 as "no
  edge", so duplicate points are not joined directly. We drop zero-length kNN edges to match.
* **Disconnected components.** A k = 20 graph can split a thin shape into components. sklearn's
  ``graph_shortest_path`` returned 0 -- not infinity -- for unreachable pairs, so in the reference a
  prediction on another component *matches every GT keypoint* there. ``disconnected="reference"``
  (default, for numbers comparable with published ones) reproduces that; ``"inf"`` treats unreachable
  pairs as infinitely far (never a match). Either way the number of unreachable (prediction, GT) pairs
  looked up is reported, so one can see whether it matters (it does not on the shapes shipped here:
  their graphs are connected).

**The authors' protocol** (``protocol="original"``, Wenri/Zero-Shot-3DKP
@116cbed583cfb686389ee5e0f08d1f9dc744bb34 ``kpeval.py`` 169-233 with the BT3D ``utils/evaluation.py`` it
imports; written from a reading, not copied): the same IoU, but

* only shapes whose prediction is complete are scored (a failed shape is left out, not a miss);
* GT point indices are *not* de-duplicated (an index annotated twice counts twice);
* geodesics are the full k = 20 graph's (``sklearn`` ``kneighbors_graph`` + ``scipy`` ``shortest_path``,
  float32 point cloud), and unreachable pairs take the largest finite distance of that shape;
* thresholds 0.00 ... 0.20 (step 0.01) unless given.

We only compute Dijkstra rows for the points involved (predictions and GT keypoints) instead of the
reference's full 2048 x 2048 matrix; the distances are identical.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from zerokey.cli import run_function_cli
from zerokey.data import KEYPOINTNET_CLASSES, load_keypointnet_annotations, read_pcd
from zerokey.geodesics import graph_geodesics, knn_graph
from zerokey.writer import iter_prediction_files

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ORIGINAL_THRESHOLDS",
    "original_geodesics",
    "geodesic_distances",
    "shape_counts",
    "ShapeEval",
    "EvalResult",
    "evaluate_predictions",
    "load_prediction_dir",
    "select_run",
    "read_split",
    "evaluate",
    "main",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(11))
#: ``protocol="original"``: the authors' ``kpeval.py`` loops over 0.00 ... 0.20.
ORIGINAL_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(21))
PROTOCOLS = ("keypointnet", "original")


def original_geodesics(pcd: np.ndarray, k: int = 20) -> tuple[np.ndarray, int]:
    """(N, N) float32 geodesics as the authors' evaluation has them: shortest paths on the undirected
    k-nearest-neighbour graph (Euclidean edges) of the float32 cloud; unreachable pairs take the
    largest finite distance of the matrix. Returns the matrix and the number of unreachable pairs."""
    from scipy.sparse.csgraph import shortest_path
    from sklearn.neighbors import kneighbors_graph

    points = np.asarray(pcd, dtype=np.float32)
    graph = kneighbors_graph(points, min(k, len(points) - 1), mode="distance", include_self=False)
    d = shortest_path(graph, directed=False).astype(np.float32)
    unreachable = ~np.isfinite(d)
    if unreachable.any():
        d[unreachable] = d[~unreachable].max()
    return d, int(unreachable.sum())


def geodesic_distances(
    points: np.ndarray,
    sources: Sequence[int],
    targets: Sequence[int],
    k: int = 20,
    disconnected: Literal["reference", "inf"] = "reference",
    graph: csr_matrix | None = None,
) -> tuple[np.ndarray, int]:
    """(len(sources), len(targets)) geodesic distances on the undirected kNN graph.

    Returns the matrix and how many pairs were unreachable (set to 0 for ``"reference"``, inf for
    ``"inf"``).
    """
    sources = np.asarray(sources, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if sources.size == 0 or targets.size == 0:
        return np.zeros((sources.size, targets.size)), 0
    pts = torch.from_numpy(np.asarray(points, dtype=np.float64))
    graph = knn_graph(pts, k) if graph is None else graph
    unique, inverse = np.unique(sources, return_inverse=True)
    rows = graph_geodesics(pts, torch.from_numpy(unique), method="dijkstra", graph=graph).numpy()
    d = rows[inverse][:, targets]
    unreachable = ~np.isfinite(d)
    if disconnected == "reference":
        d = np.where(unreachable, 0.0, d)
    elif disconnected != "inf":
        raise ValueError(f"disconnected must be 'reference' or 'inf', got {disconnected!r}")
    return d, int(unreachable.sum())


def shape_counts(pred_to_gt: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(#GT, #missed GT, #false predictions) for one shape, from its (P, G) distance matrix -- the
    reference's ``eval_det_cls_iou`` body (``d > t`` strictly; no prediction means every GT missed)."""
    n_pred, n_gt = pred_to_gt.shape
    false_pred = int(np.count_nonzero(np.all(pred_to_gt > threshold, axis=1))) if n_pred else 0
    missed = int(np.count_nonzero(np.all(pred_to_gt.T > threshold, axis=1))) if n_gt else 0
    return n_gt, missed, false_pred


@dataclass
class ShapeEval:
    """One shape's data for the metric: predictions and GT as pcd indices, their distance matrix."""

    shape_id: str
    class_id: str
    pred_index: np.ndarray
    gt_index: np.ndarray
    distances: np.ndarray  # (P, G)
    unreachable_pairs: int = 0
    snap_distance: float = 0.0  # largest prediction -> nearest pcd point distance


@dataclass
class EvalResult:
    """Per-class IoU per threshold, their mean over classes, and bookkeeping."""

    thresholds: list[float]
    iou: dict[str, list[float]]  # category -> IoU per threshold
    mean_iou: list[float]
    shapes: dict[str, int]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    unreachable_pairs: int = 0
    disconnected: str = "reference"
    #: categories with annotated point clouds (in the split) that the scoring was asked for
    classes_asked: list[str] = field(default_factory=list)
    #: asked categories this run has no scored shape of, and why (no predictions / refused)
    classes_missing: dict[str, str] = field(default_factory=dict)

    def coverage_line(self) -> str | None:
        """One line when the run covers fewer classes than asked for (None when it covers them all)."""
        if not self.classes_missing:
            return None
        missing = "; ".join(f"{c}: {why}" for c, why in sorted(self.classes_missing.items()))
        return (
            f"this run covers {len(self.iou)} of {len(self.classes_asked)} classes asked for; the mean is "
            f"over {len(self.iou)} only. Not scored: {missing}"
        )

    def at(self, threshold: float, category: str | None = None) -> float:
        i = min(range(len(self.thresholds)), key=lambda j: abs(self.thresholds[j] - threshold))
        return self.mean_iou[i] if category is None else self.iou[category][i]

    def as_dict(self) -> dict:
        return {
            "thresholds": self.thresholds,
            "iou": self.iou,
            "mean_iou": self.mean_iou,
            "shapes": self.shapes,
            "skipped": self.skipped,
            "unreachable_pairs": self.unreachable_pairs,
            "disconnected": self.disconnected,
            "classes_asked": self.classes_asked,
            "classes_missing": self.classes_missing,
        }

    def table(self) -> str:
        head = "category".ljust(12) + "".join(f"{t:>7.2f}" for t in self.thresholds)
        lines = [head]
        for cat, values in sorted(self.iou.items()):
            lines.append(
                f"{cat[:11]:<12}" + "".join(f"{v:>7.3f}" for v in values) + f"   ({self.shapes[cat]} shapes)"
            )
        lines.append("mean".ljust(12) + "".join(f"{v:>7.3f}" for v in self.mean_iou))
        coverage = self.coverage_line()
        return "\n".join(lines + ([f"NOTE: {coverage}"] if coverage else []))


def class_iou(shapes: Sequence[ShapeEval], threshold: float) -> float:
    """Micro IoU over a class's shapes: (npos - fn) / max(npos + fp, eps), as in the reference."""
    npos = fn = fp = 0
    for s in shapes:
        g, m, f = shape_counts(s.distances, threshold)
        npos, fn, fp = npos + g, fn + m, fp + f
    return (npos - fn) / max(npos + fp, np.finfo(np.float64).eps)


def load_prediction_dir(pred_dir: str | Path) -> list[dict]:
    """All per-shape prediction JSONs under ``pred_dir`` (summaries, manifest, unreadable files skipped)."""
    return [record for _, record in iter_prediction_files(pred_dir)]


def select_run(records: Sequence[dict], run_id: str | None = None) -> tuple[list[dict], str | None]:
    """The records of one run: ``run_id`` if given, else the only run present.

    Raises ``ValueError`` naming the runs (and their shape counts) when records of several runs -- or
    run-less records of an older writer next to a run -- are mixed and no ``run_id`` picks one.
    """
    runs: dict[str | None, int] = {}
    for r in records:
        runs[r.get("run_id")] = runs.get(r.get("run_id"), 0) + 1
    if run_id is not None:
        if run_id not in runs:
            raise ValueError(f"no predictions of run {run_id!r}; runs present: {runs}")
        return [r for r in records if r.get("run_id") == run_id], run_id
    if len(runs) > 1:
        listed = ", ".join(f"{k or '<no run id>'} ({v} shapes)" for k, v in runs.items())
        raise ValueError(f"predictions of several runs are mixed here: {listed}; pick one with --run-id")
    return list(records), next(iter(runs), None)


def read_split(split: str, keypointnet_root: str | Path) -> set[str]:
    """Model ids of a KeypointNet split: a name (``test`` -> ``<root>/splits/test.txt``) or a path;
    lines ``<class_id>-<model_id>``, as the reference reads them."""
    path = Path(split)
    if not path.suffix:
        path = Path(keypointnet_root) / "splits" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    return {line.strip().split("-")[-1] for line in path.read_text().splitlines() if line.strip()}


def evaluate_predictions(
    records: Sequence[dict],
    annotations: dict[tuple[str, str], dict],
    pcd_root: str | Path,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    k: int = 20,
    disconnected: Literal["reference", "inf"] = "reference",
    use: Literal["keypoints", "clusters"] = "keypoints",
    split_ids: set[str] | None = None,
    protocol: Literal["keypointnet", "original"] = "keypointnet",
) -> EvalResult:
    """Score prediction records (the writer's JSONs, ``xyz`` in the pcd frame) against KeypointNet.

    ``use="keypoints"`` scores the chosen keypoints; ``"clusters"`` every cluster in the record.
    Records without class/model ids, annotation or pcd, or (with ``split_ids``) outside the split are
    skipped and listed in ``skipped``; records whose prediction failed (``status`` "failed") count as
    shapes with no predictions (every GT missed) and are listed in ``skipped["failed_counted_as_miss"]``;
    records a detector refused (``status`` "refused": it cannot serve the class, e.g. few-shot without
    support) are left out (``skipped["refused"]``). Classes of the annotations (with point clouds, in
    the split) that end up with no scored shape are named in ``classes_missing`` with the reason.

    ``protocol="original"`` scores as the authors' code does (module docstring): failed shapes are left
    out (``skipped["not_complete"]``), GT duplicates count, unreachable pairs take the shape's largest
    finite geodesic (``disconnected`` unused).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    pcd_root = Path(pcd_root)
    per_class: dict[str, list[ShapeEval]] = {}
    skipped: dict[str, list[str]] = {
        "no_ids": [],
        "not_in_split": [],
        "no_annotation": [],
        "no_pcd": [],
        "failed_counted_as_miss": [],
        "refused": [],
        "not_complete": [],
    }
    refused: dict[str, list[str]] = {}
    unreachable = 0
    for record in records:
        class_id, model_id = record.get("class_id"), record.get("model_id")
        if not class_id or not model_id:
            skipped["no_ids"].append(record["shape_id"])
            continue
        if split_ids is not None and model_id not in split_ids:
            skipped["not_in_split"].append(record["shape_id"])
            continue
        annotation = annotations.get((class_id, model_id))
        if annotation is None:
            skipped["no_annotation"].append(record["shape_id"])
            continue
        pcd_path = pcd_root / class_id / f"{model_id}.pcd"
        if not pcd_path.exists():
            skipped["no_pcd"].append(record["shape_id"])
            continue
        pcd, _ = read_pcd(pcd_path)
        gt = np.array([kp["pcd_info"]["point_index"] for kp in annotation["keypoints"]], dtype=np.int64)
        if protocol == "keypointnet":
            # A set, as in the reference (binary per-point label): duplicated indices count once.
            gt = np.unique(gt)
        if record.get("status") == "refused":  # the detector cannot serve this class (e.g. no support)
            skipped["refused"].append(record["shape_id"])
            refused.setdefault(class_id, []).append(str(record.get("error")))
            continue
        failed = record.get("status", "complete") != "complete" or bool(record.get("error"))
        if failed and protocol == "original":  # the authors score complete shapes only
            skipped["not_complete"].append(record["shape_id"])
            continue
        if failed:
            skipped["failed_counted_as_miss"].append(record["shape_id"])
            xyz = []
        elif use == "clusters" and record.get("clusters"):
            xyz = [c["xyz"] for clusters in record["clusters"].values() for c in clusters]
        else:
            xyz = [kp["xyz"] for kp in record.get("keypoints") or []]
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        if protocol == "original":
            pcd = np.asarray(pcd, dtype=np.float32)
        snap_distance, pred = (
            cKDTree(pcd).query(xyz) if len(xyz) else (np.zeros(0), np.zeros(0, dtype=np.int64))
        )
        if protocol == "original":
            full, n_unreachable = original_geodesics(pcd, k)
            d = full[np.asarray(pred, dtype=np.int64)][:, gt].astype(np.float64)
        else:
            d, n_unreachable = geodesic_distances(pcd, pred, gt, k=k, disconnected=disconnected)
        unreachable += n_unreachable
        per_class.setdefault(class_id, []).append(
            ShapeEval(
                record["shape_id"],
                class_id,
                np.asarray(pred),
                gt,
                d,
                n_unreachable,
                float(np.max(snap_distance, initial=0.0)),
            )
        )
    if unreachable:
        log.warning(
            "%d (prediction, GT) pairs lie on different kNN-graph components (disconnected=%s)",
            unreachable,
            disconnected,
        )
    thresholds = [float(t) for t in thresholds]
    iou = {
        KEYPOINTNET_CLASSES.get(c, c): [float(class_iou(s, t)) for t in thresholds]
        for c, s in per_class.items()
    }
    mean = [float(np.mean([v[i] for v in iou.values()])) if iou else 0.0 for i in range(len(thresholds))]
    shapes = {KEYPOINTNET_CLASSES.get(c, c): len(s) for c, s in per_class.items()}
    asked = sorted(
        {
            c
            for c, m in annotations
            if (split_ids is None or m in split_ids) and (pcd_root / c / f"{m}.pcd").exists()
        }
    )
    missing = {}
    for c in asked:
        if c in per_class:
            continue
        why = refused.get(c)
        missing[KEYPOINTNET_CLASSES.get(c, c)] = (
            f"{len(why)} shape(s) refused ({why[0]})" if why else "no prediction of this class in the run"
        )
    return EvalResult(
        thresholds,
        iou,
        mean,
        shapes,
        {k_: v for k_, v in skipped.items() if v},
        unreachable,
        "largest finite (original protocol)" if protocol == "original" else disconnected,
        [KEYPOINTNET_CLASSES.get(c, c) for c in asked],
        missing,
    )


def evaluate(
    pred: str,
    annotations: list[str],
    pcd_root: str,
    thresholds: list[float] | None = None,
    k: int = 20,
    disconnected: Literal["reference", "inf"] = "reference",
    use: Literal["keypoints", "clusters"] = "keypoints",
    split: str | None = None,
    run_id: str | None = None,
    out: str | None = None,
    protocol: Literal["keypointnet", "original"] = "keypointnet",
) -> EvalResult:
    """KeypointNet mIoU of ZeroKey predictions (``python -m zerokey evaluate``).

    Args:
        pred: folder of per-shape prediction JSONs (searched recursively).
        annotations: KeypointNet annotation JSON file(s); several may follow the flag.
        pcd_root: folder with <class_id>/<model_id>.pcd (also ``--pcd-root``).
        thresholds: geodesic thresholds (default 0.00-0.10, or 0.00-0.20 with ``--protocol original``).
        k: neighbours in the geodesic kNN graph (reference: 20).
        disconnected: unreachable pairs as the reference scores them (distance 0) or as ``inf``.
        use: score the chosen keypoints or every cluster of a record.
        split: score only this KeypointNet split: a name (test -> <pcd-root>/../splits/test.txt, as the
            reference) or a split file path; default: every annotated shape found.
        run_id: score this run when a folder holds several (also ``--run-id``).
        out: also write the result as JSON here (``thresholds``, ``mean_iou``, per class ``iou``, ...).
        protocol: ``keypointnet`` (the KeypointNet reference benchmark, default) or ``original`` (as the
            ZeroKey authors' ``kpeval.py`` scores: complete shapes only, GT duplicates counted,
            unreachable pairs = largest finite geodesic, thresholds 0.00-0.20).
    """
    if thresholds is None:
        thresholds = list(ORIGINAL_THRESHOLDS if protocol == "original" else DEFAULT_THRESHOLDS)
    records = load_prediction_dir(pred)
    if not records:
        raise SystemExit(f"no prediction JSONs found under {pred}")
    try:
        records, chosen_run = select_run(records, run_id)
    except ValueError as err:
        raise SystemExit(f"zerokey evaluate: {err}") from None
    split_ids = read_split(split, Path(pcd_root).parent) if split else None
    result = evaluate_predictions(
        records,
        load_keypointnet_annotations(annotations),
        pcd_root,
        thresholds,
        k,
        disconnected,
        use,
        split_ids,
        protocol,
    )
    if not result.shapes:
        counts = {k_: len(v) for k_, v in result.skipped.items()}
        raise SystemExit(f"zerokey evaluate: no shape could be scored (skipped: {counts})")
    print(
        f"run {chosen_run or '<no run id>'}; split: {split or 'none (every annotated shape found)'}; "
        f"protocol: {protocol}"
    )
    print(result.table())
    if result.skipped:
        print("skipped / counted:", {k_: len(v) for k_, v in result.skipped.items()}, file=sys.stderr)
    if out:
        payload = dict(result.as_dict(), run_id=chosen_run, split=split, protocol=protocol)
        Path(out).write_text(json.dumps(payload, indent=1))
    return result


def main(argv: Sequence[str] | None = None) -> EvalResult:
    """``python -m zerokey evaluate ...`` (flags: :func:`evaluate`'s parameters)."""
    return run_function_cli(evaluate, argv, "python -m zerokey evaluate")
