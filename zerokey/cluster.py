"""Per-name clustering of the lifted 3D candidates, choice of the densest cluster, snapping to the surface.

Reproduces ZeroKey (arXiv:2412.06292): the candidates of one name are clustered with HDBSCAN
(minPts k = 10) and the keypoint is the centroid of the *densest* cluster. Defaults follow the paper;
everything else is an option, off by default (``docs/fidelity.md`` lists them):

**minPts counts points.** ``min_samples`` (k) and ``min_cluster_size`` count lifted candidates, one per
patch pixel (the ray-surface intersections of the paper). HDBSCAN itself runs unweighted on them -- which
candidates group together does not depend on the Gaussian weights -- and the weights enter where the
paper's soft voting acts: the centroid is the weight-averaged position, and each point's density is
averaged with its weight when clusters are ranked. Candidates should be distinct surface points, as mesh
(barycentric) and depth lifting give; lifting a point cloud to the *cloud point* each pixel hits
(``lift_method="points"``) makes 25 pixels coincide on a few points, and HDBSCAN then calls each well-hit
cloud point a cluster of its own (on 4 KeypointNet airplanes, oracle bench: IoU@0.01 0.31 vs 0.95 with
depth lifting), which is why ``lift_method="auto"`` unprojects depth for clouds. ``weighting="weight"``
(option) instead makes HDBSCAN itself weighted: ``hdbscan`` takes no sample weights, so a candidate of
weight ``w`` becomes ``round(w * resolution)`` duplicated rows and k / min_cluster_size are then counted
in weight units (``min_samples`` in rows is ``resolution * (k + 1) - 1``, so the core ball holds weight
``k + 1`` at every resolution; weight ``w`` behaves exactly like ``w`` duplicated points).

**"Densest" is HDBSCAN's own density.** HDBSCAN estimates the density at a point as ``lambda = 1 /
core_distance`` (core distance: the distance to the k-th nearest other point, the same ``tree.query(k =
min_samples + 1)`` hdbscan computes; here among distinct positions, floored at :data:`MIN_CORE_DISTANCE`,
so coinciding candidates do not make a density infinite). A cluster's density is the weight-averaged
lambda of its members, and clusters are ranked by it, densest first. This is the quantity HDBSCAN's
hierarchy is built on (mutual reachability), it does not grow with the number of votes (a cluster that is
large but diffuse is not dense), and it is scale-free within one name. ``selection="weight"`` (option)
ranks by total weight instead -- which, on a synthetic case (tests), prefers a diffuse cluster (spread
0.070) over a tight one (0.008).

Options (off in the paper config): ``cluster_selection_epsilon`` merges clusters closer than epsilon;
``min_views`` drops clusters seen in fewer views; ``method="mean"`` replaces HDBSCAN by the plain
weighted mean of all candidates (the paper's "averaging" ablation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from zerokey.lift import Candidates3D
from zerokey.original import min_cluster_size_ladder

__all__ = [
    "ClusterConfig",
    "Cluster",
    "weighted_hdbscan",
    "clusters_from_labels",
    "cluster_candidates",
    "original_clusters",
    "closest_point_on_mesh",
    "nearest_point",
]

log = logging.getLogger(__name__)

#: Core distances are floored here (normalised units, 1/10 of KeypointNet's finest threshold) when
#: ranking by density: candidates that coincide (pixels hitting one cloud point) have core distance 0.
MIN_CORE_DISTANCE = 1e-3


@dataclass
class ClusterConfig:
    """Attributes:
    method: "hdbscan" (paper) or "mean" (ablation: one cluster per name, the weighted mean), or
        "original" (the authors' code, :func:`original_clusters`: fast_hdbscan with sample weights, the
        min_cluster_size ladder, every cluster heavier than ``keep_factor`` x the heaviest detection;
        ``min_samples``, ``selection``, ``weighting``, ``cluster_selection_epsilon``, ``min_views`` unused).
        The authors' ablations: "raw_mean" (``kpeval_rawpts.py``: the unweighted mean of a name's
        candidates, one keypoint) and "binary" (the binary back-projection of ``schelling_points.py``:
        sklearn ``HDBSCAN(min_cluster_size=2, cluster_selection_epsilon=0.1, allow_single_cluster=True)``,
        unweighted mean per cluster, every cluster kept).
    min_samples: HDBSCAN ``min_samples`` = the paper's minPts k = 10, in points (or weight units with
        ``weighting="weight"``).
    min_cluster_size: smallest cluster, same units (10, with k).
    selection: "density" (paper: the densest cluster first, see module docstring) or "weight"
        (option: the heaviest cluster first).
    weighting: "points" (paper: minPts counts points, weights enter centroid and ranking) or
        "weight" (option: HDBSCAN on weight-duplicated rows, minPts in weight units).
    resolution: rows per unit weight for ``weighting="weight"`` (quantisation step 1/resolution).
    max_rows: cap on duplicated rows per name (resolution is lowered to fit, logged).
    allow_single_cluster: let HDBSCAN return the root as one cluster. Needed: a keypoint seen
        consistently gives exactly one blob, which hdbscan's default (False) splits or calls noise.
    cluster_selection_epsilon: option (0 = plain HDBSCAN): clusters closer than this (normalised
        units) are merged.
    min_views: option (1 = keep all): clusters supported by fewer distinct views are dropped.
    ladder_start: ``method="original"``: first min_cluster_size; halved (rounding up) while nothing
        clusters and it is >= 2 (10 -> 5 -> 3 -> 2).
    max_candidates: ``method="original"``: a name's candidates are randomly subsampled to this many.
    keep_factor: ``method="original"``: clusters whose raw weight exceeds this x the heaviest single
        detection are kept (all clusters when none does).
    seed: ``method="original"``: the subsample's seed (the original's is unseeded).
    """

    min_samples: int = 10
    min_cluster_size: int = 10
    resolution: float = 4.0
    max_rows: int = 200_000
    allow_single_cluster: bool = True
    cluster_selection_epsilon: float = 0.0
    min_views: int = 1
    method: Literal["hdbscan", "mean", "original", "raw_mean", "binary"] = "hdbscan"
    ladder_start: int = 10
    max_candidates: int = 10_000
    keep_factor: float = 2.0
    seed: int = 0
    selection: Literal["density", "weight"] = "density"
    weighting: Literal["points", "weight"] = "points"

    def __post_init__(self) -> None:
        choices = {
            "method": ("hdbscan", "mean", "original", "raw_mean", "binary"),
            "selection": ("density", "weight"),
            "weighting": ("points", "weight"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ClusterConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.min_samples < 1 or self.min_cluster_size < 2:
            raise ValueError("min_samples must be >= 1 and min_cluster_size >= 2")
        if self.ladder_start < 2 or self.max_candidates < 2 or self.keep_factor < 0:
            raise ValueError("ladder_start and max_candidates must be >= 2, keep_factor >= 0")


@dataclass
class Cluster:
    """One cluster of candidates: weighted centroid, total weight, size, views, density."""

    centroid: Tensor  # (3,)
    weight: float
    size: int
    n_views: int
    spread: float  # weighted RMS distance of members to the centroid
    members: Tensor  # (m,) indices into the candidates the clustering saw
    density: float = 0.0  # weight-averaged HDBSCAN lambda = 1 / core distance (0 for method="mean")


def _as_numpy(values: np.ndarray | Tensor) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    return np.asarray(array, dtype=np.float64)


def _core_distances(rows: np.ndarray, queries: np.ndarray, min_samples: int) -> np.ndarray:
    """HDBSCAN's core distance of each query among ``rows`` (``k = min_samples + 1`` counting itself)."""
    from scipy.spatial import cKDTree

    k = min(min_samples + 1, len(rows))
    distance, _ = cKDTree(rows).query(queries, k=k)
    return np.asarray(distance).reshape(len(queries), -1)[:, -1]


def weighted_hdbscan(
    points: np.ndarray | Tensor,
    weights: np.ndarray | Tensor,
    config: ClusterConfig | None = None,
    return_core: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """HDBSCAN labels (-1 = noise) for weighted points, per ``config.weighting`` (module docstring).

    With ``return_core`` also each point's core distance (inf where undefined), for density ranking.
    """
    import hdbscan

    config = config or ClusterConfig()
    x, w = _as_numpy(points), _as_numpy(weights)
    if x.ndim != 2 or w.shape != (x.shape[0],):
        raise ValueError(f"points must be (n,d) and weights (n,), got {x.shape} and {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and >= 0")
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    core = np.full(x.shape[0], np.inf)
    if config.weighting == "points":
        rows, min_samples, min_cluster_size = x, config.min_samples, config.min_cluster_size
        point_row = np.arange(x.shape[0])
    else:
        resolution = float(config.resolution)
        counts = np.rint(w * resolution).astype(np.int64)
        if counts.sum() > config.max_rows:
            resolution *= config.max_rows / counts.sum()
            log.info(
                "weighted_hdbscan: over max_rows=%d rows; resolution lowered to %.3g",
                config.max_rows,
                resolution,
            )
            counts = np.rint(w * resolution).astype(np.int64)
        min_samples = max(1, int(round((config.min_samples + 1) * resolution)) - 1)
        min_cluster_size = max(2, int(round(config.min_cluster_size * resolution)))
        kept = np.nonzero(counts)[0]
        rows = np.repeat(x[kept], counts[kept], axis=0)
        # Copies of one point sit at distance 0 from each other and join the tree together, so they
        # share a label; take the first copy's. Points of weight < 0.5/resolution vanish (noise).
        first_row = np.full(x.shape[0], -1, dtype=np.int64)
        first_row[kept] = np.concatenate([[0], np.cumsum(counts[kept])[:-1]])
        point_row = first_row
    if len(rows) < max(min_cluster_size, min_samples + 1):
        return (labels, core) if return_core else labels  # not enough support for any cluster
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        allow_single_cluster=config.allow_single_cluster,
        cluster_selection_epsilon=config.cluster_selection_epsilon,
        # Exact MST: the approximate Boruvka tree depends on row layout (and so on the resolution).
        approx_min_span_tree=False,
        core_dist_n_jobs=1,
    )
    row_labels = clusterer.fit_predict(rows)
    valid = point_row >= 0
    labels[valid] = row_labels[point_row[valid]]
    if return_core:
        # Density from distinct positions: candidates that coincide (pixels hitting one cloud point)
        # are one place on the surface, not k neighbours.
        distinct = np.unique(x[valid], axis=0)
        core[valid] = _core_distances(distinct, x[valid], config.min_samples)
        return labels, core
    return labels


def clusters_from_labels(
    xyz: Tensor,
    weight: Tensor,
    labels: np.ndarray | Tensor,
    view: Tensor | None = None,
    core_distance: np.ndarray | None = None,
    selection: Literal["density", "weight"] = "weight",
) -> list[Cluster]:
    """Summarise labelled candidates into clusters, ranked densest first (``selection="density"``,
    needs ``core_distance``) or heaviest first (``"weight"``)."""
    labels_t = torch.as_tensor(labels, device=xyz.device)
    lam = None
    if core_distance is not None:
        lam = torch.as_tensor(1.0 / np.maximum(core_distance, MIN_CORE_DISTANCE), dtype=torch.float64)
    out: list[Cluster] = []
    for label in torch.unique(labels_t[labels_t >= 0]).tolist():
        members = torch.nonzero(labels_t == label).squeeze(-1)
        w = weight[members].double()
        p = xyz[members].double()
        total = float(w.sum())
        centroid = (w[:, None] * p).sum(0) / max(total, 1e-12)
        spread = float(((w * ((p - centroid) ** 2).sum(-1)).sum() / max(total, 1e-12)).sqrt())
        n_views = int(torch.unique(view[members]).numel()) if view is not None else 0
        density = float((w.cpu() * lam[members.cpu()]).sum() / max(total, 1e-12)) if lam is not None else 0.0
        out.append(Cluster(centroid.float(), total, int(members.numel()), n_views, spread, members, density))
    if selection == "density":
        if core_distance is None:
            raise ValueError("selection='density' needs core distances")
        out.sort(key=lambda c: -c.density)
    else:
        out.sort(key=lambda c: -c.weight)
    return out


def _mean_cluster(mine: Candidates3D) -> list[Cluster]:
    w = mine.weight.double()
    total = float(w.sum())
    if not total > 0:
        return []
    p = mine.xyz.double()
    centroid = (w[:, None] * p).sum(0) / total
    spread = float(((w * ((p - centroid) ** 2).sum(-1)).sum() / total).sqrt())
    members = torch.arange(len(mine), device=mine.xyz.device)
    return [
        Cluster(centroid.float(), total, len(mine), int(torch.unique(mine.view).numel()), spread, members)
    ]


def cluster_candidates(
    candidates: Candidates3D, n_names: int, config: ClusterConfig | None = None
) -> list[list[Cluster]]:
    """Cluster each name's candidates separately; per name its clusters (seen in at least
    ``config.min_views`` views), densest (or heaviest) first."""
    config = config or ClusterConfig()
    result: list[list[Cluster]] = []
    for i in range(n_names):
        mine = candidates.select(candidates.name_index == i)
        if len(mine) == 0:
            result.append([])
            continue
        if config.method == "mean":
            clusters = _mean_cluster(mine)
        elif config.method == "original":
            clusters = original_clusters(mine, config)
        elif config.method == "raw_mean":
            clusters = _plain_clusters(mine, np.zeros(len(mine), dtype=np.int64))
        elif config.method == "binary":
            clusters = _plain_clusters(mine, _binary_labels(mine.xyz))
        else:
            labels, core = weighted_hdbscan(mine.xyz, mine.weight, config, return_core=True)
            clusters = clusters_from_labels(mine.xyz, mine.weight, labels, mine.view, core, config.selection)
        result.append([c for c in clusters if c.n_views >= config.min_views])
    return result


def original_clusters(mine: Candidates3D, config: ClusterConfig | None = None) -> list[Cluster]:
    """One name's keypoints as the authors' code finds them (``kpviews.py`` ``aggregate_kps``,
    Wenri/Zero-Shot-3DKP @116cbed583cfb686389ee5e0f08d1f9dc744bb34, lines 152-190; not copied).

    * 0 or 1 candidates: returned as they are (no clustering);
    * more than ``max_candidates``: a random subsample of that many (seeded here);
    * ``fast_hdbscan.HDBSCAN(min_cluster_size=m, allow_single_cluster=True)`` with
      ``sample_weight = weight / mean_weight`` (``Candidates3D.mean_weight``: the mean over all disc
      pixels of the name, background included; the mean of ``weight`` without it), min_samples left at
      its default (= m, counted in weight); m runs down the ladder 10 -> 5 -> 3 -> 2 until some label
      is not noise;
    * a cluster's weight is the sum of its raw weights; the heaviest single detection is the largest
      sum of raw weights of one detection's (subsampled) candidates; clusters heavier than
      ``keep_factor`` x that are kept (strictly), all of them when none is;
    * centroids are raw-weight averages, heaviest cluster first. ``Cluster.density`` is 0.
    """
    config = config or ClusterConfig(method="original")
    n = len(mine)
    if n == 0:
        return []
    xyz, weight = mine.xyz.double(), mine.weight.double()
    if n == 1:
        members = torch.zeros(1, dtype=torch.long, device=xyz.device)
        return [Cluster(xyz[0].float(), float(weight[0]), 1, 1, 0.0, members)]
    mean = float(mine.mean_weight[0]) if mine.mean_weight is not None else float(weight.mean())
    index = torch.arange(n, device=xyz.device)
    if n > config.max_candidates:
        rng = np.random.default_rng(config.seed)
        chosen = np.sort(rng.choice(n, config.max_candidates, replace=False))
        index = torch.as_tensor(chosen, device=xyz.device)
    x, w, source, view = xyz[index], weight[index], mine.source[index], mine.view[index]
    _, det = torch.unique(source, return_inverse=True)
    heaviest = float(
        torch.zeros(int(det.max()) + 1, dtype=torch.float64, device=w.device).index_add_(0, det, w).max()
    )
    labels = fast_hdbscan_ladder(x.cpu().numpy(), (w / max(mean, 1e-12)).cpu().numpy(), config.ladder_start)
    clusters = clusters_from_labels(x, w, labels, view, selection="weight")
    kept = [c for c in clusters if c.weight > config.keep_factor * heaviest] or clusters
    for c in kept:
        c.members = index[c.members]
    return kept


def _binary_labels(xyz: Tensor) -> np.ndarray:
    """HDBSCAN as the authors' binary back-projection runs it (``schelling_points.py`` @1b2338d: sklearn's
    with these settings). Run through the ``hdbscan`` package, of which sklearn's is a port: sklearn 1.6's
    epsilon search raises a TypeError when it reaches the root with ``allow_single_cluster``."""
    import hdbscan

    if len(xyz) < 2:
        return np.zeros(len(xyz), dtype=np.int64)
    model = hdbscan.HDBSCAN(min_cluster_size=2, cluster_selection_epsilon=0.1, allow_single_cluster=True)
    return np.asarray(model.fit_predict(xyz.detach().cpu().double().numpy()), dtype=np.int64)


def _plain_clusters(mine: Candidates3D, labels: np.ndarray) -> list[Cluster]:
    """Unweighted means of the labelled groups (the authors' ablations), largest group first."""
    ones = torch.ones(len(mine), dtype=torch.float64, device=mine.xyz.device)
    return clusters_from_labels(mine.xyz, ones, labels, mine.view, selection="weight")


def fast_hdbscan_ladder(points: np.ndarray, sample_weight: np.ndarray, start: int = 10) -> np.ndarray:
    """Labels of the first ``fast_hdbscan`` run of the ladder (``start``, halved rounding up, while
    >= 2) that finds a cluster; all -1 when none does."""
    from fast_hdbscan import HDBSCAN

    labels = np.full(len(points), -1, dtype=np.int64)
    for m in min_cluster_size_ladder(start):
        labels = HDBSCAN(min_cluster_size=m, allow_single_cluster=True).fit_predict(
            np.ascontiguousarray(points, dtype=np.float32), sample_weight=sample_weight.astype(np.float32)
        )
        if (labels >= 0).any():
            break
    return np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------------------------ snapping
def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return num / torch.where(den.abs() < 1e-20, torch.full_like(den, 1e-20), den)


def _closest_on_triangles(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Closest points on triangles (a,b,c) to points p, all broadcast to (..., 3).

    Voronoi-region case analysis (Ericson, Real-Time Collision Detection, 5.1.5), written with
    ``torch.where`` so all (point, triangle) pairs are handled at once; regions are applied in reverse
    priority so the vertex regions win exactly as in the sequential algorithm.
    """
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    bp = p - b
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    cp = p - c
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = va + vb + vc
    v = _safe_div(vb, denom)
    w = _safe_div(vc, denom)
    result = a + ab * v[..., None] + ac * w[..., None]  # interior
    w_bc = _safe_div(d4 - d3, (d4 - d3) + (d5 - d6))
    result = torch.where(
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0))[..., None], b + (c - b) * w_bc[..., None], result
    )
    w_ac = _safe_div(d2, d2 - d6)
    result = torch.where(((vb <= 0) & (d2 >= 0) & (d6 <= 0))[..., None], a + ac * w_ac[..., None], result)
    result = torch.where(((d6 >= 0) & (d5 <= d6))[..., None], c.expand_as(result), result)
    v_ab = _safe_div(d1, d1 - d3)
    result = torch.where(((vc <= 0) & (d1 >= 0) & (d3 <= 0))[..., None], a + ab * v_ab[..., None], result)
    result = torch.where(((d3 >= 0) & (d4 <= d3))[..., None], b.expand_as(result), result)
    result = torch.where(((d1 <= 0) & (d2 <= 0))[..., None], a.expand_as(result), result)
    return result


def closest_point_on_mesh(
    queries: Tensor, vertices: Tensor, faces: Tensor, max_pairs: int = 2_000_000
) -> Tensor:
    """(Q,3) exact closest surface points of a triangle mesh.

    Pruned brute force, fully vectorised: a triangle can only hold the closest point if its lower
    bound ``|p - centroid| - radius`` (radius = farthest vertex from the centroid) does not exceed the
    upper bound ``min_f |p - centroid_f|`` (every centroid lies on the surface). The exact
    point-triangle test then runs on the surviving (query, triangle) pairs only -- usually a handful
    per query -- in chunks of at most ``max_pairs``.
    """
    if queries.numel() == 0:
        return queries.clone()
    queries = queries.to(vertices)
    tri = vertices[faces]  # (F,3,3)
    centroid = tri.mean(1)
    radius = (tri - centroid[:, None]).norm(dim=-1).amax(1)
    to_centroid = torch.cdist(queries, centroid)  # (Q,F)
    upper = to_centroid.min(dim=1, keepdim=True).values
    q_idx, f_idx = torch.nonzero(to_centroid - radius[None] <= upper + 1e-7, as_tuple=True)
    best = torch.full((queries.shape[0],), float("inf"), device=queries.device, dtype=queries.dtype)
    best_point = queries.clone()
    for start in range(0, q_idx.numel(), max_pairs):
        q, f = q_idx[start : start + max_pairs], f_idx[start : start + max_pairs]
        p = queries[q]
        closest = _closest_on_triangles(p, tri[f, 0], tri[f, 1], tri[f, 2])  # (pairs,3)
        d = ((closest - p) ** 2).sum(-1)
        chunk_best = torch.full_like(best, float("inf")).scatter_reduce(0, q, d, reduce="amin")
        # Index of a pair achieving each query's minimum (ties: any of them).
        hit = d == chunk_best[q]
        winner = torch.full_like(q_idx[:1].expand(best.shape[0]), -1).scatter_reduce(
            0, q[hit], torch.nonzero(hit).squeeze(-1), reduce="amax", include_self=True
        )
        improved = (chunk_best < best) & (winner >= 0)
        best = torch.where(improved, chunk_best, best)
        best_point[improved] = closest[winner[improved]]
    return best_point


def nearest_point(queries: Tensor, cloud: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest cloud point to each query: ((Q,3) points, (Q,) indices)."""
    if queries.numel() == 0:
        return queries.clone(), torch.zeros(0, dtype=torch.long, device=queries.device)
    index = torch.cdist(queries.to(cloud), cloud).argmin(dim=1)
    return cloud[index], index
