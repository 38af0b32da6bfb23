"""Weighted HDBSCAN over 3D candidates, densest-cluster selection and snapping to the surface.

``hdbscan`` takes no sample weights, so weights are implemented by duplicating rows: a candidate of
weight ``w`` becomes ``round(w * resolution)`` identical rows, and ``min_samples`` /
``min_cluster_size`` are multiplied by ``resolution``. Why that is the right weighting:

* HDBSCAN's core distance is the smallest radius whose ball holds ``min_samples + 1`` rows (the point
  itself included); with duplicates that is the smallest radius whose ball holds total weight
  ``min_samples + 1`` -- a weighted core distance (``min_samples`` in rows is set to
  ``resolution * (k + 1) - 1`` so the weight threshold stays ``k + 1`` at every resolution);
* cluster sizes and stabilities in the condensed tree count rows, i.e. total weight.

So weight ``w`` behaves exactly like ``w`` duplicated rows (for integer ``w`` at ``resolution=1``), and
the result does not depend on ``resolution`` beyond quantisation (weights are rounded to multiples of
``1/resolution``; rows of weight < ``0.5/resolution`` vanish and are reported as noise). The row count
is capped (``max_rows``) by lowering the resolution, logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from zerokey.lift import Candidates3D

__all__ = [
    "ClusterConfig",
    "Cluster",
    "weighted_hdbscan",
    "clusters_from_labels",
    "cluster_candidates",
    "closest_point_on_mesh",
    "nearest_point",
]

log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    """Attributes:
    min_samples: HDBSCAN ``min_samples`` (k), in weight units (a patch-centre pixel weighs 1).
    min_cluster_size: smallest cluster, in weight units.
    resolution: rows per unit weight for the duplication (quantisation step 1/resolution).
    max_rows: cap on duplicated rows per name (resolution is lowered to fit).
    allow_single_cluster: let HDBSCAN return the root as one cluster. Needed here: a keypoint seen
        consistently gives exactly one blob, which the default (False) would split or call noise.
    cluster_selection_epsilon: HDBSCAN's epsilon (normalised units): clusters closer than this are
        merged. HDBSCAN alone tends to split one Gaussian blob of candidates into a dense core and
        fragments; 0.03 (1.5% of the unit sphere's diameter) merges those and measurably helps on
        KeypointNet (see the bench). 0 gives plain HDBSCAN.
    min_views: clusters supported by fewer distinct views are dropped. One 2D detection already
        weighs ~2*pi*sigma^2 (17 for h = 5) -- more than ``min_cluster_size`` -- so without this a single
        stray answer in one view would become a keypoint. 3 of the 26 views: with 5% outliers it
        gave mIoU@0.05 0.99 vs 0.95 for 2 on the KeypointNet shapes here (bench, 2 px noise).
    """

    min_samples: int = 10
    min_cluster_size: int = 10
    resolution: float = 4.0
    max_rows: int = 200_000
    allow_single_cluster: bool = True
    cluster_selection_epsilon: float = 0.03
    min_views: int = 3


@dataclass
class Cluster:
    """One cluster of candidates: weighted centroid, total weight, size, views that support it."""

    centroid: Tensor  # (3,)
    weight: float
    size: int
    n_views: int
    spread: float  # weighted RMS distance of members to the centroid
    members: Tensor  # (m,) indices into the candidates the clustering saw


def weighted_hdbscan(
    points: np.ndarray | Tensor, weights: np.ndarray | Tensor, config: ClusterConfig | None = None
) -> np.ndarray:
    """HDBSCAN labels (-1 = noise) for weighted points, via row duplication (see module docstring)."""
    import hdbscan

    config = config or ClusterConfig()
    x = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    w = weights.detach().cpu().numpy() if isinstance(weights, Tensor) else np.asarray(weights)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if x.ndim != 2 or w.shape != (x.shape[0],):
        raise ValueError(f"points must be (n,d) and weights (n,), got {x.shape} and {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and >= 0")
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    resolution = float(config.resolution)
    counts = np.rint(w * resolution).astype(np.int64)
    if counts.sum() > config.max_rows:
        resolution *= config.max_rows / counts.sum()
        log.info(
            "weighted_hdbscan: %d rows over max_rows=%d; resolution lowered to %.3g",
            counts.sum(),
            config.max_rows,
            resolution,
        )
        counts = np.rint(w * resolution).astype(np.int64)
    # hdbscan's core distance is the distance to the (min_samples + 1)-th row counting the point itself,
    # i.e. the smallest radius holding rows >= min_samples + 1. With r rows per unit weight that is
    # weight >= (rows + 1) / r; choosing rows = r (k + 1) - 1 makes it weight >= k + 1 at every r, the
    # same as plain HDBSCAN(min_samples=k) on w duplicated rows.
    min_samples = max(1, int(round((config.min_samples + 1) * resolution)) - 1)
    min_cluster_size = max(2, int(round(config.min_cluster_size * resolution)))
    n_rows = int(counts.sum())
    if n_rows < max(min_cluster_size, min_samples + 1):
        return labels  # not enough weight for any cluster: all noise
    kept = np.nonzero(counts)[0]
    rows = np.repeat(x[kept], counts[kept], axis=0)
    first_row = np.concatenate([[0], np.cumsum(counts[kept])[:-1]])
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        allow_single_cluster=config.allow_single_cluster,
        cluster_selection_epsilon=config.cluster_selection_epsilon,
        # Exact MST: the approximate Boruvka tree depends on row layout, which would make results
        # depend on the duplication resolution.
        approx_min_span_tree=False,
        core_dist_n_jobs=1,
    )
    row_labels = clusterer.fit_predict(rows)
    # Copies of one point sit at distance 0 from each other and join the tree together, so they share
    # a label; take the first copy's.
    labels[kept] = row_labels[first_row]
    return labels


def clusters_from_labels(
    xyz: Tensor, weight: Tensor, labels: np.ndarray | Tensor, view: Tensor | None = None
) -> list[Cluster]:
    """Summarise labelled candidates into clusters, sorted by total weight (densest first)."""
    labels_t = torch.as_tensor(labels, device=xyz.device)
    out: list[Cluster] = []
    for label in torch.unique(labels_t[labels_t >= 0]).tolist():
        members = torch.nonzero(labels_t == label).squeeze(-1)
        w = weight[members].double()
        p = xyz[members].double()
        total = float(w.sum())
        centroid = (w[:, None] * p).sum(0) / max(total, 1e-12)
        spread = float(((w * ((p - centroid) ** 2).sum(-1)).sum() / max(total, 1e-12)).sqrt())
        n_views = int(torch.unique(view[members]).numel()) if view is not None else 0
        out.append(Cluster(centroid.float(), total, int(members.numel()), n_views, spread, members))
    out.sort(key=lambda c: -c.weight)
    return out


def cluster_candidates(
    candidates: Candidates3D, n_names: int, config: ClusterConfig | None = None
) -> list[list[Cluster]]:
    """Cluster each name's candidates separately; returns per name its clusters seen in at least
    ``config.min_views`` views, densest first."""
    config = config or ClusterConfig()
    result: list[list[Cluster]] = []
    for i in range(n_names):
        mine = candidates.select(candidates.name_index == i)
        if len(mine) == 0:
            result.append([])
            continue
        labels = weighted_hdbscan(mine.xyz, mine.weight, config)
        clusters = clusters_from_labels(mine.xyz, mine.weight, labels, mine.view)
        result.append([c for c in clusters if c.n_views >= config.min_views])
    return result


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
