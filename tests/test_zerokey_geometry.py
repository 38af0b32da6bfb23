"""Lifting, the OraclePointer, weighted clustering and surface snapping against known answers."""

from __future__ import annotations

import math

import hdbscan
import numpy as np
import pytest
import torch
import trimesh

from patchalign.render import look_at_cameras, render_mesh, render_points
from zerokey.cluster import (
    ClusterConfig,
    closest_point_on_mesh,
    cluster_candidates,
    clusters_from_labels,
    nearest_point,
    weighted_hdbscan,
)
from zerokey.data import ShapeSample
from zerokey.lift import Candidates3D, lift_points
from zerokey.mllm.pointers import OraclePointer
from zerokey.views import RenderedViews

SIZE, FOV, EYE_Z, PLANE_Z = 64, 60.0, 3.0, 0.5


def _two_planes() -> tuple[torch.Tensor, torch.Tensor]:
    """Squares [-1,1]^2 at z = +0.5 (front) and z = -0.5 (back), two triangles each."""
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    front = torch.cat([corners, torch.full((4, 1), PLANE_Z)], 1)
    back = torch.cat([corners, torch.full((4, 1), -PLANE_Z)], 1)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    return torch.cat([front, back]), faces


def _front_back_views(vertices, faces) -> RenderedViews:
    cams = look_at_cameras(
        torch.tensor([[0.0, 0.0, EYE_Z], [0.0, 0.0, -EYE_Z]]), fov_deg=FOV, image_size=SIZE
    )
    out = render_mesh(vertices, faces, cams, backend="embree")
    return RenderedViews(out.image, cams, out.depth, out.mask, out.pix_to_face, out.bary)


def _analytic_front(uv: torch.Tensor) -> torch.Tensor:
    """World point of the front plane seen at pixel uv from the camera at (0,0,3) looking down -z with
    +y up: image x = world x, image down = world -y, depth 2.5."""
    f = (SIZE / 2) / math.tan(math.radians(FOV) / 2)
    depth = EYE_Z - PLANE_Z
    x = (uv[:, 0] - SIZE / 2) / f * depth
    y = -(uv[:, 1] - SIZE / 2) / f * depth
    return torch.stack([x, y, torch.full_like(x, PLANE_Z)], 1)


@pytest.mark.parametrize("method", ["barycentric", "depth"])
def test_lift_single_pixel_hits_known_surface_point(method):
    vertices, faces = _two_planes()
    views = _front_back_views(vertices, faces)
    uv = torch.tensor([[32.5, 32.5], [20.5, 40.5], [50.5, 12.5]])
    c = lift_points(
        uv, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 1]), views, vertices, faces, 1, method
    )
    assert torch.allclose(c.xyz, _analytic_front(uv), atol=1e-5)
    assert c.weight.tolist() == [1.0, 1.0, 1.0] and c.name_index.tolist() == [0, 1, 1]
    # Seen from behind (image right = world -x, image down = world -y), the same pixels lift to the
    # back plane, mirrored in x.
    back = lift_points(
        uv,
        torch.ones(3, dtype=torch.long),
        torch.zeros(3, dtype=torch.long),
        views,
        vertices,
        faces,
        1,
        method,
    )
    assert torch.allclose(back.xyz, _analytic_front(uv) * torch.tensor([-1.0, 1.0, -1.0]), atol=1e-5)


def test_lift_gaussian_patch_weights_and_positions():
    vertices, faces = _two_planes()
    views = _front_back_views(vertices, faces)
    uv = torch.tensor([[32.2, 32.9]])
    c = lift_points(
        uv, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), views, vertices, faces, 3
    )
    assert len(c) == 9
    # Independent: the 3x3 pixels whose centres are nearest (32.2, 32.9) are columns/rows 31..33.
    cols, rows = torch.meshgrid(torch.arange(31, 34), torch.arange(31, 34), indexing="xy")
    centres = torch.stack([cols.reshape(-1), rows.reshape(-1)], 1).float() + 0.5
    sigma = 3 / 3
    expected_w = torch.exp(-((centres - uv) ** 2).sum(1) / (2 * sigma**2))
    order_got = torch.argsort(c.xyz[:, 0] * 1000 - c.xyz[:, 1])
    order_exp = torch.argsort(_analytic_front(centres)[:, 0] * 1000 - _analytic_front(centres)[:, 1])
    assert torch.allclose(c.xyz[order_got], _analytic_front(centres)[order_exp], atol=1e-5)
    assert torch.allclose(c.weight[order_got], expected_w[order_exp], atol=1e-6)


def test_lift_drops_background_and_off_image_pixels():
    vertices, faces = _two_planes()
    views = _front_back_views(vertices, faces)
    # The plane's right edge x = 1 projects to column S/2 + f * 1/2.5; a detection right on it keeps
    # only its on-plane columns.
    f = (SIZE / 2) / math.tan(math.radians(FOV) / 2)
    edge = SIZE / 2 + f / (EYE_Z - PLANE_Z)
    uv = torch.tensor([[edge, 32.5], [0.2, 0.2]])
    c = lift_points(
        uv, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), views, vertices, faces, 5
    )
    assert (c.xyz[:, 0] <= 1 + 1e-6).all()
    assert 0 < (c.source == 0).sum() < 25
    assert (c.source == 1).sum() == 0  # corner of the image: background only


def test_lift_point_cloud_returns_cloud_points():
    g = torch.linspace(-1, 1, 41)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    cloud = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.full((41 * 41,), PLANE_Z)], 1)
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, EYE_Z]]), fov_deg=FOV, image_size=SIZE)
    out = render_points(cloud, cams, radius=0.04, backend="cpu")
    views = RenderedViews(out.image, cams, out.depth, out.mask, pix_to_point=out.pix_to_point)
    uv = torch.tensor([[32.5, 32.5], [40.5, 20.5]])
    zeros = torch.zeros(2, dtype=torch.long)

    def lift(*mode: str):
        return lift_points(uv, zeros, zeros, views, cloud, None, 1, *mode)

    c = lift("points")
    assert torch.cdist(c.xyz, cloud).min(1).values.max() == 0  # exactly cloud points
    auto = lift()
    assert torch.allclose(auto.xyz, _analytic_front(uv), atol=1e-4)  # auto = depth for clouds
    assert torch.allclose(c.xyz, _analytic_front(uv), atol=0.05 + 1e-6)  # within one grid step
    d = lift("depth")
    assert torch.allclose(
        d.xyz, _analytic_front(uv), atol=1e-4
    )  # depth of the winning point, at the pixel ray
    with pytest.raises(ValueError, match="barycentric"):
        lift("barycentric")


# --------------------------------------------------------------------------------------------- oracle
def _plane_shape() -> ShapeSample:
    vertices, faces = _two_planes()
    kps = torch.tensor([[0.0, 0.0, PLANE_Z], [0.3, -0.2, -PLANE_Z], [0.5, 0.5, PLANE_Z]])
    return ShapeSample(
        "planes",
        "mem",
        vertices,
        faces,
        torch.zeros(3),
        1.0,
        keypoints=kps,
        keypoint_names=["front", "back", "front"],
    )


def test_oracle_projects_visible_keypoints_only():
    shape = _plane_shape()
    views = _front_back_views(shape.vertices, shape.faces)
    pts = OraclePointer()(shape, ["front", "back", "absent"], views)
    got = sorted(
        zip(
            pts.view.tolist(),
            pts.name_index.tolist(),
            [tuple(round(x, 4) for x in p) for p in pts.uv.tolist()],
            strict=True,
        )
    )
    uv, _ = views.cameras.project(shape.keypoints)
    expect = sorted(
        [
            (0, 0, tuple(round(x, 4) for x in uv[0, 0].tolist())),
            (0, 0, tuple(round(x, 4) for x in uv[0, 2].tolist())),
            (1, 1, tuple(round(x, 4) for x in uv[1, 1].tolist())),
        ]
    )
    assert got == expect  # the back keypoint is hidden from the front camera and vice versa
    assert pts.stats.points == 3 and pts.stats.answers == 6 and pts.stats.declined == 4 and pts.calls == 0


def test_oracle_noise_dropout_outliers_are_seeded():
    shape = _plane_shape()
    views = _front_back_views(shape.vertices, shape.faces)
    clean = OraclePointer()(shape, ["front"], views)
    a = OraclePointer(noise_px=1.5, seed=3)(shape, ["front"], views)
    b = OraclePointer(noise_px=1.5, seed=3)(shape, ["front"], views)
    c = OraclePointer(noise_px=1.5, seed=4)(shape, ["front"], views)
    assert torch.equal(a.uv, b.uv) and not torch.equal(a.uv, c.uv)
    assert 0 < (a.uv - clean.uv).abs().max() < 10
    assert len(OraclePointer(dropout=1.0)(shape, ["front"], views)) == 0
    out = OraclePointer(outlier_rate=1.0, seed=1)(shape, ["front"], views)
    pix = out.uv.floor().long()
    assert views.mask[out.view, pix[:, 1], pix[:, 0]].all()  # outliers land on the object
    assert not torch.allclose(out.uv, clean.uv)
    with pytest.raises(ValueError, match="ground-truth"):
        OraclePointer()(
            ShapeSample("x", "m", shape.vertices, shape.faces, torch.zeros(3), 1.0), ["front"], views
        )
    with pytest.raises(ValueError, match="dropout"):
        OraclePointer(dropout=1.5)


# -------------------------------------------------------------------------------------------- cluster
def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.nonzero(labels == k)[0].tolist()) for k in set(labels.tolist()) if k >= 0}


def _blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal([0, 0, 0], 0.03, (25, 3))
    b = rng.normal([1, 0, 0], 0.03, (25, 3))
    noise = rng.uniform(-1, 2, (10, 3))
    return np.concatenate([a, b, noise])


def test_integer_weight_equals_duplicated_rows():
    x = _blobs()
    w = np.random.default_rng(1).integers(1, 5, len(x))
    config = ClusterConfig(min_samples=10, min_cluster_size=10, resolution=1.0, weighting="weight")
    ours = weighted_hdbscan(x, w, config)
    rows = np.repeat(x, w, axis=0)
    ref = hdbscan.HDBSCAN(min_samples=10, min_cluster_size=10, allow_single_cluster=True).fit_predict(
        rows
    )  # plain
    first = np.concatenate([[0], np.cumsum(w)[:-1]])
    assert _partition(ours) == _partition(ref[first])
    assert len(_partition(ours)) == 2
    # The resolution only quantises: integer weights give the same clusters at any resolution.
    for resolution in (2.0, 3.0):
        again = weighted_hdbscan(x, w, ClusterConfig(10, 10, resolution=resolution, weighting="weight"))
        assert _partition(again) == _partition(ours)


def test_weights_change_the_result():
    rng = np.random.default_rng(0)
    big = rng.normal([0, 0, 0], 0.02, (40, 3))
    small = rng.normal([1, 0, 0], 0.02, (6, 3))
    x = np.concatenate([big, small])
    config = ClusterConfig(min_samples=5, min_cluster_size=10, weighting="weight")
    light = weighted_hdbscan(x, np.ones(len(x)), config)
    assert (light[40:] == -1).all()  # 6 points of weight 1 < min_cluster_size: noise
    heavy_w = np.ones(len(x))
    heavy_w[40:] = 3.0
    heavy = weighted_hdbscan(x, heavy_w, config)
    assert len(set(heavy[40:].tolist())) == 1 and heavy[40] >= 0 and heavy[40] != heavy[0]
    # Heaviest first (selection="weight"): the small blob wins once it outweighs the big one
    # (6 x 4 > 40 x 0.5).
    w = np.full(len(x), 0.5)
    w[40:] = 4.0
    labels = weighted_hdbscan(x, w, config)
    clusters = clusters_from_labels(torch.tensor(x), torch.tensor(w), labels, selection="weight")
    assert [c.size for c in clusters] == [6, 40] and abs(clusters[0].weight - 24) < 1e-9
    expected = x[40:].mean(0)
    assert np.allclose(clusters[0].centroid.numpy(), expected, atol=1e-6)


def test_weighted_hdbscan_edge_cases():
    config = ClusterConfig(min_samples=10, min_cluster_size=10, weighting="weight")
    assert (weighted_hdbscan(np.zeros((3, 3)), np.ones(3), config) == -1).all()  # too little weight
    labels = weighted_hdbscan(_blobs(), np.full(60, 0.01), config)  # all quantised to 0 rows
    assert (labels == -1).all()
    with pytest.raises(ValueError, match="weights"):
        weighted_hdbscan(np.zeros((2, 3)), np.array([1.0, -1.0]), config)
    full = weighted_hdbscan(_blobs(), np.ones(60), ClusterConfig(10, 10, resolution=4.0, weighting="weight"))
    capped = weighted_hdbscan(
        _blobs(), np.ones(60), ClusterConfig(10, 10, resolution=4.0, max_rows=120, weighting="weight")
    )
    assert _partition(capped) == _partition(full) and len(_partition(full)) == 2  # resolution lowered to 2


def test_cluster_candidates_per_name():
    x = torch.tensor(_blobs(), dtype=torch.float32)
    names = torch.cat([torch.zeros(25), torch.ones(25), torch.full((10,), 2)]).long()
    weight = torch.cat([torch.ones(50), torch.full((10,), 0.3)])  # name 2: total weight 3 < 5
    cands = Candidates3D(x, weight, names, torch.arange(60) % 7, torch.arange(60))
    # Without an epsilon HDBSCAN may prefer a dense core of a Gaussian blob over the whole blob; the
    # selection epsilon merges clusters closer than 0.1 (the blobs are 1 apart).
    config = ClusterConfig(5, 5, cluster_selection_epsilon=0.1, weighting="weight")
    per_name = cluster_candidates(cands, 4, config)
    assert [len(c) for c in per_name] == [1, 1, 0, 0]
    # min_views: a cluster must be supported by that many distinct views.
    config8 = ClusterConfig(5, 5, cluster_selection_epsilon=0.1, min_views=8, weighting="weight")
    assert [len(c) for c in cluster_candidates(cands, 4, config8)] == [0, 0, 0, 0]
    assert per_name[0][0].size == 25 and per_name[0][0].n_views == 7
    assert torch.allclose(per_name[1][0].centroid, x[25:50].mean(0), atol=1e-5)


# ------------------------------------------------------------------------------------------- snapping
def test_closest_point_on_cube_matches_analytic():
    box = trimesh.creation.box(extents=(2, 2, 2))
    vertices = torch.tensor(box.vertices, dtype=torch.float32)
    faces = torch.tensor(box.faces, dtype=torch.long)
    rng = np.random.default_rng(0)
    outside = torch.tensor(rng.uniform(-3, 3, (200, 3)), dtype=torch.float32)
    outside = outside[(outside.abs() > 1).any(1)]
    got = closest_point_on_mesh(outside, vertices, faces, max_pairs=500)  # force several chunks
    assert torch.allclose(got, outside.clamp(-1, 1), atol=1e-5)  # outside a box: clamp
    inside = torch.tensor([[0.9, 0.1, -0.2], [0.0, -0.95, 0.3]])
    assert torch.allclose(
        closest_point_on_mesh(inside, vertices, faces),
        torch.tensor([[1.0, 0.1, -0.2], [0.0, -1.0, 0.3]]),
        atol=1e-6,
    )
    # Random triangle soup vs trimesh's per-triangle closest point, brute force over all triangles.
    rng = np.random.default_rng(1)
    soup = rng.uniform(-1, 1, (60, 3, 3))
    queries = rng.uniform(-1.5, 1.5, (40, 3))
    per_tri = np.stack([trimesh.triangles.closest_point(soup, np.repeat(q[None], 60, 0)) for q in queries])
    best = per_tri[np.arange(40), np.linalg.norm(per_tri - queries[:, None], axis=-1).argmin(1)]
    got = closest_point_on_mesh(
        torch.tensor(queries),
        torch.tensor(soup.reshape(-1, 3)),
        torch.arange(180).reshape(60, 3),
        max_pairs=50,
    )
    assert np.allclose(got.numpy(), best, atol=1e-9)
    cloud = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0]])
    p, i = nearest_point(torch.tensor([[0.9, 0.1, 0.0], [0.1, 1.2, 0.0]]), cloud)
    assert i.tolist() == [1, 2] and torch.equal(p, cloud[[1, 2]])


# ------------------------------------------------------------------- paper's cluster choice and ablations
def _tight_and_diffuse() -> tuple[np.ndarray, np.ndarray]:
    """A tight blob (RMS spread ~0.008, 30 points) and a diffuse one (~0.070, 90 points) 1 apart."""
    rng = np.random.default_rng(3)
    tight = rng.normal([0.0, 0.0, 0.0], 0.008 / math.sqrt(3), (30, 3))
    diffuse = rng.normal([1.0, 0.0, 0.0], 0.070 / math.sqrt(3), (90, 3))
    return np.concatenate([tight, diffuse]), np.ones(120)


def test_densest_cluster_is_chosen_by_default_not_the_heaviest():
    x, w = _tight_and_diffuse()
    n = len(x)
    cands = Candidates3D(
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(w),
        torch.zeros(n, dtype=torch.long),
        torch.arange(n) % 5,
        torch.arange(n),
    )
    paper = cluster_candidates(cands, 1, ClusterConfig())[0]
    heaviest = cluster_candidates(cands, 1, ClusterConfig(selection="weight"))[0]
    assert len(paper) == 2 and len(heaviest) == 2
    assert paper[0].size == 30 and paper[0].spread < 0.012  # the tight blob
    assert heaviest[0].size == 90 and heaviest[0].spread > 0.05  # the diffuse one outweighs it
    assert np.allclose(paper[0].centroid.numpy(), x[:30].mean(0), atol=1e-5)


def test_cluster_density_is_weighted_mean_inverse_core_distance():
    x, _ = _tight_and_diffuse()
    w = np.random.default_rng(4).uniform(0.2, 1.0, len(x))
    labels, core = weighted_hdbscan(x, w, ClusterConfig(), return_core=True)
    # Independent: distance to the 10th nearest other point, by brute force.
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    expected_core = np.sort(d, axis=1)[:, 10]
    assert np.allclose(core, expected_core, rtol=1e-9)
    clusters = clusters_from_labels(torch.tensor(x), torch.tensor(w), labels, None, core, "density")
    for c in clusters:
        m = c.members.numpy()
        assert math.isclose(c.density, float((w[m] / expected_core[m]).sum() / w[m].sum()), rel_tol=1e-9)


def test_min_pts_counts_points_weights_do_not_change_the_partition():
    x, _ = _tight_and_diffuse()
    w1 = np.ones(len(x))
    w2 = np.random.default_rng(5).uniform(0.01, 0.3, len(x))  # the tight blob weighs < 10 in total
    a = weighted_hdbscan(x, w1, ClusterConfig())
    b = weighted_hdbscan(x, w2, ClusterConfig())
    assert _partition(a) == _partition(b) and len(_partition(a)) == 2
    assert w2[:30].sum() < 10
    in_weight_units = weighted_hdbscan(x, w2, ClusterConfig(weighting="weight"))
    assert (in_weight_units[:30] == -1).all() and (b[:30] >= 0).all()


def test_plain_average_ablation_is_the_weighted_mean():
    x, _ = _tight_and_diffuse()
    w = np.random.default_rng(6).uniform(0.1, 1.0, len(x))
    n = len(x)
    cands = Candidates3D(
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(w),
        torch.zeros(n, dtype=torch.long),
        torch.arange(n) % 3,
        torch.arange(n),
    )
    (only,) = cluster_candidates(cands, 1, ClusterConfig(method="mean"))[0:1][0]
    assert np.allclose(only.centroid.numpy(), (w[:, None] * x).sum(0) / w.sum(), atol=1e-6)
    assert only.n_views == 3 and only.size == n


def test_binary_voting_gives_every_patch_pixel_weight_one():
    vertices, faces = _two_planes()
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, EYE_Z]]), fov_deg=FOV, image_size=SIZE)
    out = render_mesh(vertices, faces, cams, backend="embree")
    views = RenderedViews(out.image, cams, out.depth, out.mask, out.pix_to_face, out.bary)
    uv = torch.tensor([[32.3, 30.8]])
    zero = torch.zeros(1, dtype=torch.long)
    soft = lift_points(uv, zero, zero, views, vertices, faces, 5)
    hard = lift_points(uv, zero, zero, views, vertices, faces, 5, voting="binary")
    assert torch.equal(soft.xyz, hard.xyz) and len(hard) == 25
    assert torch.equal(hard.weight, torch.ones(25))
    assert soft.weight.max() < 1.0 and soft.weight.min() > 0.0


def test_view_layouts_6_26_46():
    from zerokey.views import view_layout

    # 26: 8 azimuths at polar 45 / 90 / 135 (azimuth 0 = +z, 90 = +x; polar from +y), then poles
    # 5 degrees off +y / -y towards +z; hand-worked eyes at distance 2:
    e26, r = view_layout(26, distance=2.0), math.sqrt(2.0)
    assert torch.allclose(e26[0], torch.tensor([0.0, r, r]), atol=1e-6)  # polar 45, azimuth 0
    assert torch.allclose(e26[2], torch.tensor([r, r, 0.0]), atol=1e-6)  # polar 45, azimuth 90
    assert torch.allclose(e26[8], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)  # equator, azimuth 0
    assert torch.allclose(e26[22], torch.tensor([-r, -r, 0.0]), atol=1e-6)  # polar 135, azimuth 270
    tilt = math.radians(5.0)
    assert torch.allclose(e26[24], 2 * torch.tensor([0.0, math.cos(tilt), math.sin(tilt)]), atol=1e-6)
    assert torch.allclose(e26[25], 2 * torch.tensor([0.0, -math.cos(tilt), math.sin(tilt)]), atol=1e-6)
    for n in (6, 26, 46):
        eyes = view_layout(n, distance=2.5)
        assert eyes.shape == (n, 3)
        assert torch.allclose(eyes.norm(dim=1), torch.full((n,), 2.5), atol=1e-5)
        assert torch.cdist(eyes, eyes).add(torch.eye(n) * 10).min() > 0.2  # all distinct
    six = view_layout(6, distance=1.0)
    axes = torch.tensor([[0, 0, 1.0], [1, 0, 0], [0, 0, -1], [-1, 0, 0]])
    assert torch.allclose(six[:4], axes, atol=1e-6)
    assert six[4, 1] > 0.99 and six[5, 1] < -0.99  # top and bottom (5 degrees off the pole)
    # 46: rings of 6 / 10 / 12 / 10 / 6 at polar 30..150, then the poles.
    polar = torch.rad2deg(torch.acos(view_layout(46, distance=1.0)[:44, 1]))
    expected = torch.tensor([30.0] * 6 + [60.0] * 10 + [90.0] * 12 + [120.0] * 10 + [150.0] * 6)
    assert torch.allclose(polar, expected, atol=1e-3)
    with pytest.raises(ValueError, match="6, 26, 46"):
        view_layout(12)
