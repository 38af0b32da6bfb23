"""Geodesic distances on a point cloud's k-nearest-neighbour graph: the one implementation behind the
feature keypoints' peak search (:mod:`zerokey.features.keypoints`) and KeypointNet's evaluation
(:mod:`zerokey.evaluate`).

The graph is KeypointNet's (qq456cvb/KeypointNet@33dd3874e285896fda97e4a2775b5903ea39d772
``benchmark_scripts/utils.gen_geo_dists``: ``kneighbors_graph(pc, k, mode='distance',
include_self=False)``, shortest paths treated as undirected): every point links to its ``k`` nearest
other points with its Euclidean distance as edge length; a path may use an edge from either end.

* **Self and duplicates.** The query asks ``k + 1`` neighbours and drops the point itself; with
  duplicated points the self-match may not come first, so the column equal to the row is dropped if
  present, else the farthest. Zero-length edges (between duplicates) are dropped: the reference's
  sklearn ``graph_shortest_path`` densified the graph and read 0 as "no edge".
* **Memory is O(N k).** Neighbours come from a k-d tree on the CPU (scipy's ``cKDTree``, exact) and
  from :func:`patchalign.grouping.knn_indices` on accelerators, in query chunks of at most
  ``chunk_elements`` distances; no N x N matrix is ever built (a 200,000-point cloud would need 160 GB).
* **Shortest paths** from a few sources: SciPy's C Dijkstra for CPU tensors, or min-plus (Bellman-Ford)
  relaxation over all sources at once on the padded adjacency (:func:`symmetric_neighbours`) on
  accelerators, so the work stays on the device the points are on. Both are exact; points on another
  graph component stay ``inf``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from torch import Tensor

from patchalign.grouping import knn_indices

__all__ = [
    "CHUNK_ELEMENTS",
    "knn_edges",
    "knn_graph",
    "symmetric_neighbours",
    "geodesic_graph",
    "graph_geodesics",
]

#: distances computed at once by the chunked accelerator kNN (2^24 floats = 64 MB per chunk).
CHUNK_ELEMENTS = 1 << 24


def _neighbours(points: Tensor, k: int, chunk_elements: int, backend: str) -> tuple[Tensor, Tensor]:
    """``(N, k + 1)`` nearest indices (self included) and distances, in O(N k) memory."""
    n = points.shape[0]
    if backend == "auto":
        backend = "kdtree" if points.device.type == "cpu" else "torch"
    if backend == "kdtree":
        from scipy.spatial import cKDTree

        xyz = points.detach().cpu().double().numpy()
        distance, index = cKDTree(xyz).query(xyz, k=k + 1)
        index = torch.from_numpy(np.asarray(index, dtype=np.int64).reshape(n, k + 1)).to(points.device)
        distance = torch.from_numpy(np.asarray(distance).reshape(n, k + 1)).to(points.device, points.dtype)
        return index, distance
    if backend != "torch":
        raise ValueError(f"unknown kNN backend {backend!r}: use 'auto', 'kdtree' or 'torch'")
    rows = max(1, chunk_elements // max(n, 1))
    pts = points.float()
    index = torch.cat([knn_indices(pts[None, s : s + rows], pts[None], k + 1)[0] for s in range(0, n, rows)])
    distance = (points[index] - points[:, None]).norm(dim=-1)
    return index, distance


def knn_edges(
    points: Tensor, k: int = 10, chunk_elements: int = CHUNK_ELEMENTS, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Directed kNN edges ``(src, dst, length)`` (module docstring: self and zero-length edges dropped).

    Args:
        points: ``(N, 3)``; lengths come out in its dtype, on its device.
        k: neighbours per point (capped at ``N - 1``).
        chunk_elements: most distances held at once by the accelerator path.
        backend: ``auto`` (k-d tree on CPU, chunked torch elsewhere), ``kdtree`` or ``torch``.
    """
    n = points.shape[0]
    k = min(k, n - 1)
    empty = torch.zeros(0, dtype=torch.long, device=points.device)
    if k < 1:
        return empty, empty, torch.zeros(0, dtype=points.dtype, device=points.device)
    index, distance = _neighbours(points, k, chunk_elements, backend)
    rows = torch.arange(n, device=points.device)[:, None]
    is_self = index == rows
    drop = torch.where(is_self.any(1), is_self.int().argmax(1), torch.full_like(rows[:, 0], k))
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[torch.arange(n, device=points.device), drop] = False
    src, dst, length = rows.expand_as(index)[keep], index[keep], distance[keep]
    nonzero = length > 0
    return src[nonzero], dst[nonzero], length[nonzero]


def knn_graph(points: Tensor | np.ndarray, k: int = 10, **kwargs) -> csr_matrix:
    """The directed kNN graph as a SciPy ``(N, N)`` CSR matrix of edge lengths (float64).

    ``dijkstra(graph, directed=False)`` on it gives the symmetrised graph's shortest paths.
    """
    pts = torch.as_tensor(points)
    src, dst, length = knn_edges(pts, k, **kwargs)
    n = pts.shape[0]
    return csr_matrix((length.double().cpu().numpy(), (src.cpu().numpy(), dst.cpu().numpy())), shape=(n, n))


def symmetric_neighbours(points: Tensor, k: int = 10, **kwargs) -> tuple[Tensor, Tensor]:
    """Padded adjacency of the symmetrised kNN graph: ``(N, D)`` neighbour indices and lengths.

    Row ``i`` lists every ``j`` with ``j`` in kNN(i) or ``i`` in kNN(j), once; padding entries point at
    ``i`` itself with length ``inf``. ``D`` is the largest degree (k to a few times k).
    """
    n = points.shape[0]
    src, dst, w = knn_edges(points, k, **kwargs)
    a, b = torch.cat([src, dst]), torch.cat([dst, src])
    length = torch.cat([w, w])
    key, order = torch.sort(a * n + b, stable=True)
    keep = torch.ones_like(key, dtype=torch.bool)
    keep[1:] = key[1:] != key[:-1]  # the same edge listed from both ends
    a, b, length = a[order][keep], b[order][keep], length[order][keep]
    degree = torch.bincount(a, minlength=n)
    start = torch.cumsum(degree, 0) - degree
    slot = torch.arange(a.numel(), device=points.device) - start[a]
    width = int(degree.max()) if a.numel() else 1
    nbr = torch.arange(n, device=points.device)[:, None].expand(n, width).clone()
    dist = torch.full((n, width), float("inf"), device=points.device, dtype=length.dtype)
    nbr[a, slot], dist[a, slot] = b, length
    return nbr, dist


def graph_geodesics(
    points: Tensor,
    sources: Tensor,
    k: int = 10,
    method: str = "auto",
    max_iters: int | None = None,
    graph: csr_matrix | tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``(S, N)`` shortest-path distances from each source to every point (module docstring), in the
    points' floating dtype (float64 for the evaluation, whose thresholds are compared exactly).

    Args:
        points: ``(N, 3)``.
        sources: ``(S,)`` point indices.
        method: ``dijkstra`` (CPU), ``relax`` (on the points' device) or ``auto`` (by device).
        graph: the graph built once and reused across calls: :func:`knn_graph`'s matrix for
            ``dijkstra``, :func:`symmetric_neighbours`' pair for ``relax``.
    """
    n = points.shape[0]
    dtype = points.dtype if points.is_floating_point() else torch.float32
    if method == "auto":
        method = "dijkstra" if points.device.type == "cpu" else "relax"
    if method == "dijkstra":
        if graph is None:
            graph = knn_graph(points, k)
        out = dijkstra(graph, directed=False, indices=sources.long().cpu().numpy())
        return torch.from_numpy(out).to(points.device, dtype).reshape(sources.numel(), n)
    if method != "relax":
        raise ValueError(f"unknown geodesic method {method!r}: use 'auto', 'dijkstra' or 'relax'")
    nbr, w = graph if graph is not None else symmetric_neighbours(points, k)
    s = sources.numel()
    dist = torch.full((s, n), float("inf"), device=points.device, dtype=dtype)
    dist[torch.arange(s, device=points.device), sources.long()] = 0.0
    for _ in range(max_iters or n):
        new = torch.minimum(dist, (dist[:, nbr] + w[None]).amin(-1))
        if torch.equal(new, dist):
            break
        dist = new
    return dist


def geodesic_graph(points: Tensor, k: int = 10, method: str = "auto") -> csr_matrix | tuple[Tensor, Tensor]:
    """The graph :func:`graph_geodesics` needs for ``method`` (build once, query many times)."""
    if method == "auto":
        method = "dijkstra" if points.device.type == "cpu" else "relax"
    return knn_graph(points, k) if method == "dijkstra" else symmetric_neighbours(points, k)
