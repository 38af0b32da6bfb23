"""Keypoints from dense features (zerokey.features.keypoints): interpolation, geodesics, peaks, prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from zerokey.features.keypoints import (
    build_prototypes,
    interpolate_patch_values,
    match_prototypes,
    name_probabilities,
    peak_keypoints,
)
from zerokey.geodesics import graph_geodesics, knn_edges, knn_graph, symmetric_neighbours


def test_interpolation_matches_hand_worked_inverse_squared_distance():
    centers = torch.tensor([[0.0, 0, 0], [2.0, 0, 0], [10.0, 0, 0]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    points = torch.tensor([[1.0, 0, 0], [0.5, 0, 0], [2.0, 0, 0]])
    out = interpolate_patch_values(points, centers, values, k=2)
    # (1,0,0): equidistant from centres 0 and 1 -> their mean.
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5]))
    # (0.5,0,0): d^2 = 0.25 and 2.25 -> weights 4 and 1/2.25.
    w0, w1 = 4.0, 1 / 2.25
    assert torch.allclose(out[1], torch.tensor([w0, w1]) / (w0 + w1), atol=1e-6)
    # on a centre: that centre's value.
    assert torch.allclose(out[2], values[1], atol=1e-6)
    batched = interpolate_patch_values(points[None], centers[None], values[None], k=2)
    assert torch.allclose(batched[0], out)


def test_graph_geodesics_equal_scipy_dijkstra_on_the_symmetrised_knn_graph():
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=gen)
    n = pts.shape[0]
    # the graph built independently: brute-force distances, 6 nearest others per row
    full = np.linalg.norm(pts.numpy()[:, None].astype(np.float64) - pts.numpy()[None], axis=-1)
    np.fill_diagonal(full, np.inf)
    idx = np.argsort(full, axis=1)[:, :6]
    rows = np.repeat(np.arange(n), 6)
    graph = csr_matrix((full[rows, idx.reshape(-1)], (rows, idx.reshape(-1))), shape=(n, n))
    sources = torch.tensor([0, 17, 299])
    ref = shortest_path(graph, directed=False, indices=sources.numpy())
    finite = np.isfinite(ref)
    for method in ("relax", "dijkstra"):
        ours = graph_geodesics(pts, sources, k=6, method=method).numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(ref))
        assert np.allclose(ours[finite], ref[finite], atol=1e-5)


def _u_shape(n_side: int = 120) -> torch.Tensor:
    """Two parallel prongs 0.1 apart joined at the bottom: close in space, 2+ apart on the surface."""
    t = torch.linspace(0, 1, n_side)
    left = torch.stack([torch.zeros_like(t), t, torch.zeros_like(t)], -1)
    right = torch.stack([torch.full_like(t, 0.1), t, torch.zeros_like(t)], -1)
    bottom = torch.stack([torch.linspace(0, 0.1, 12)[1:-1], torch.zeros(10), torch.zeros(10)], -1)
    return torch.cat([left, right, bottom])


def test_peaks_land_on_known_positions_with_geodesic_suppression():
    pts = _u_shape()
    tip_left, tip_right = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.1, 1.0, 0.0])
    middle_left = torch.tensor([0.0, 0.5, 0.0])
    # name 0 ("tip", two instances): bumps at both prong tips; name 1: one bump mid-left.
    s_tip = torch.exp(-(((pts - tip_left).norm(dim=-1) / 0.05) ** 2)) + 0.9 * torch.exp(
        -(((pts - tip_right).norm(dim=-1) / 0.05) ** 2)
    )
    s_mid = torch.exp(-(((pts - middle_left).norm(dim=-1) / 0.05) ** 2))
    scores = torch.stack([s_tip, s_mid], -1)
    peaks = peak_keypoints(pts, scores, instances=[2, 1], region_radius=0.03, nms_radius=0.3, graph_k=4)
    assert [(p.name_index, p.instance) for p in peaks] == [(0, 0), (0, 1), (1, 0)]
    # the tips are 0.1 apart in space, far less than nms_radius: only geodesic NMS keeps both.
    assert torch.allclose(peaks[0].xyz, tip_left, atol=0.02)
    assert torch.allclose(peaks[1].xyz, tip_right, atol=0.02)
    assert torch.allclose(peaks[2].xyz, middle_left, atol=0.02)
    assert peaks[0].score == pytest.approx(float(s_tip.max()))
    # a point index that is the snapped output
    assert torch.equal(pts[peaks[1].point_index], peaks[1].xyz)


def test_min_score_drops_weak_peaks():
    pts = _u_shape()
    scores = torch.full((pts.shape[0], 1), 0.1)
    assert peak_keypoints(pts, scores, min_score=0.5) == []
    assert len(peak_keypoints(pts, scores)) == 1


def test_name_probabilities_softmax_over_names():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = name_probabilities(feats, text, logit_scale=10.0)
    e = torch.exp(torch.tensor(10.0))
    assert torch.allclose(p[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    assert torch.allclose(name_probabilities(feats, text, 1.0, mode="cosine"), torch.eye(2))


def test_prototype_retrieves_its_own_support_point_and_averages_over_supports():
    gen = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(500, 16, generator=gen), torch.randn(400, 16, generator=gen)
    idx1, sid1 = torch.tensor([3, 250, 499]), torch.tensor([0, 4, 7])
    one = build_prototypes([f1], [idx1], [sid1])
    assert one.ids.tolist() == [0, 4, 7] and one.support.tolist() == [1, 1, 1]
    best, sim = match_prototypes(f1, one)
    assert best.tolist() == [3, 250, 499]
    assert torch.allclose(sim, torch.ones(3), atol=1e-6)
    idx2, sid2 = torch.tensor([10, 20]), torch.tensor([4, 9])
    two = build_prototypes([f1, f2], [idx1, idx2], [sid1, sid2])
    assert two.ids.tolist() == [0, 4, 7, 9] and two.support.tolist() == [1, 2, 1, 1] and two.n_shapes == 2
    n = torch.nn.functional.normalize
    expected = n(n(f1[250].double(), dim=0) + n(f2[10].double(), dim=0), dim=0)
    assert torch.allclose(two.features[1], expected, atol=1e-9)


def test_knn_edges_kdtree_and_chunked_torch_paths_agree_and_drop_self():
    """The CPU k-d tree and the accelerator's chunked torch kNN give the same graph, chunk by chunk."""
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(500, 3, generator=gen)
    a = knn_edges(pts, k=5, backend="kdtree")
    b = knn_edges(pts, k=5, backend="torch", chunk_elements=500 * 37)  # 37 query rows per chunk
    key = lambda e: sorted(zip(e[0].tolist(), e[1].tolist(), strict=True))  # noqa: E731
    assert key(a) == key(b)
    assert torch.allclose(a[2].sort().values, b[2].sort().values, atol=1e-6)
    assert not (a[0] == a[1]).any() and (a[2] > 0).all()
    dup = torch.tensor([[0.0, 0, 0], [0, 0, 0], [1, 0, 0], [3, 0, 0]])  # 0 and 1 coincide
    for backend in ("kdtree", "torch"):
        src, dst, length = knn_edges(dup, k=2, backend=backend)
        edges = set(zip(src.tolist(), dst.tolist(), strict=True))
        assert {(0, 1), (1, 0)}.isdisjoint(edges) and not (src == dst).any()
        assert (0, 2) in edges and (3, 2) in edges


def test_relaxation_on_the_padded_graph_equals_dijkstra():
    gen = torch.Generator().manual_seed(2)
    pts = torch.rand(400, 3, generator=gen)
    sources = torch.tensor([0, 5, 399])
    d = graph_geodesics(pts, sources, k=6, method="dijkstra")
    r = graph_geodesics(pts, sources, k=6, method="relax", graph=symmetric_neighbours(pts, 6))
    assert torch.allclose(d, r, atol=1e-5)
    assert knn_graph(pts, 6).shape == (400, 400)


_BIG_CLOUD = """
import resource, sys, torch
from zerokey.features.keypoints import peak_keypoints
gen = torch.Generator().manual_seed(0)
n = int(sys.argv[1])
pts = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scores = torch.stack([pts[:, 0], pts[:, 1]], -1)
peaks = peak_keypoints(pts, scores, [2, 1], region_radius=0.05, nms_radius=0.3)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(peaks), before, after)
"""


def test_peaks_on_a_50k_point_cloud_run_in_bounded_memory():
    """A dense N x N distance matrix for 50,000 points is 10 GB; the kNN graph path needs O(N k)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _BIG_CLOUD, "50000"], capture_output=True, text=True, timeout=300, check=True
    )
    n_peaks, before_kb, after_kb = map(int, out.stdout.split())
    assert n_peaks == 3
    assert (after_kb - before_kb) < 600_000, f"peak search grew the process by {after_kb - before_kb} kB"
