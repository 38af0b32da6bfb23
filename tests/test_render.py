"""Renderer tests: camera maths against hand-worked answers, Embree vs PyTorch3D agreement on real
meshes, known-geometry renders, view layouts, point splatting vs PyTorch3D, mesh loading errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from patchalign.render import (
    Cameras,
    MeshLoadError,
    find3d_cameras,
    find3d_view_layout,
    fov_to_fit_unit_sphere,
    load_mesh_normalized,
    look_at_cameras,
    render_mesh,
    render_points,
    ring_view_layout,
)
from patchalign.render import mesh as mesh_module
from patchalign.render import points as points_module
from patchalign.render.io import MeshNormalization
from patchalign.tools.bench.render import bench_points, bench_render

BACKENDS = ["embree", "pytorch3d"]
SPHERE_26 = ((45.0, 8), (90.0, 8), (135.0, 8))  # the 26-view sphere (ZeroKey's default layout)


def _sphere26(distance: float = 2.5, pole_tilt_deg: float = 5.0) -> torch.Tensor:
    return ring_view_layout(SPHERE_26, distance, pole_tilt_deg)


def _meshes_dir(shared_data: Path) -> Path:
    path = shared_data / "meshes"
    if not path.is_dir():
        pytest.skip(f"no meshes at {path}")
    return path


def _grid_plane(n: int = 6, half: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """An n x n grid of squares in the z = 0 plane over [-half, half]^2, two triangles per square.

    Square (i, j) spans x in [x_i, x_i+1], y in [y_j, y_j+1]; its triangle 2*(j*n+i) is the half
    below the diagonal y - y_j < x - x_i (vertices 00, 10, 11) and 2*(j*n+i)+1 the other half.
    """
    ticks = torch.linspace(-half, half, n + 1)
    ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
    vertices = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.zeros(xs.numel())], dim=-1)
    faces = []
    for j in range(n):
        for i in range(n):
            v00, v10 = j * (n + 1) + i, j * (n + 1) + i + 1
            v01, v11 = v00 + n + 1, v10 + n + 1
            faces += [[v00, v10, v11], [v00, v11, v01]]
    return vertices, torch.tensor(faces)


def _grid_face_of(points: torch.Tensor, n: int = 6, half: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic face id containing each (x, y, 0) point of :func:`_grid_plane` and its distance (world
    units) to the nearest triangle edge."""
    cell = 2 * half / n
    gx = (points[:, 0] + half) / cell
    gy = (points[:, 1] + half) / cell
    i, j = gx.floor().long(), gy.floor().long()
    fx, fy = gx - i, gy - j
    face = 2 * (j * n + i) + (fy >= fx).long()
    edge = torch.stack([fx, 1 - fx, fy, 1 - fy, (fx - fy).abs() / math.sqrt(2)], dim=-1).min(-1).values
    return face, edge * cell


# ------------------------------------------------------------------------------------- cameras
def test_project_hand_worked_values() -> None:
    size, fov = 100, 90.0
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, 2.5]]), fov_deg=fov, image_size=size)
    focal = 50.0 / math.tan(math.radians(45.0))  # = 50 px
    assert cams.focal.item() == pytest.approx(focal)
    pts = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    uv, depth = cams.project(pts)
    # Camera on +z looking at -z: world +x is image right, world +y is image up (row decreases).
    expected_uv = torch.tensor([[50 + focal * 0.5 / 2.5, 50.0], [50.0, 50 - focal * 0.5 / 2.5], [50.0, 50.0]])
    assert torch.allclose(uv[0], expected_uv, atol=1e-5)
    assert torch.allclose(depth[0], torch.tensor([2.5, 2.5, 2.0]), atol=1e-6)
    assert torch.allclose(cams.centers, torch.tensor([[0.0, 0.0, 2.5]]), atol=1e-6)


def test_unproject_inverts_project() -> None:
    eyes = torch.cat([_sphere26(), torch.tensor([[0.3, -2.0, 1.0]])])
    cams = look_at_cameras(eyes, at=torch.tensor([0.1, 0.2, -0.1]), fov_deg=50.0, image_size=64)
    pts = torch.rand(200, 3) * 2 - 1
    uv, depth = cams.project(pts)
    back = cams.unproject(uv, depth)
    assert back.shape == (len(cams), 200, 3)
    assert torch.allclose(back, pts.expand_as(back), atol=2e-5)


@pytest.mark.parametrize("layout", ["find3d", "zerokey"])
def test_look_at_targets_image_centre_and_is_a_rotation(layout: str) -> None:
    eyes = find3d_view_layout() if layout == "find3d" else _sphere26()
    cams = look_at_cameras(eyes, image_size=64)
    uv, depth = cams.project(torch.zeros(1, 3))
    assert torch.allclose(uv[:, 0], torch.full((len(cams), 2), 32.0), atol=1e-4)
    assert torch.allclose(depth[:, 0], eyes.norm(dim=-1), atol=1e-5)
    eye3 = torch.eye(3).expand(len(cams), 3, 3)
    assert torch.allclose(cams.R @ cams.R.transpose(1, 2), eye3, atol=1e-5)
    assert torch.allclose(torch.linalg.det(cams.R), torch.ones(len(cams)), atol=1e-5)
    assert torch.allclose(cams.centers, eyes, atol=1e-5)
    # World up (+y) points up in the image (negative view-y) wherever it is not the viewing axis.
    up_in_view = cams.R[:, 1, 1]
    side = eyes[:, 1].abs() < 0.9 * eyes.norm(dim=-1)
    assert bool((up_in_view[side] < 0).all())


def test_look_at_eye_parallel_to_up_has_no_nan() -> None:
    eyes = torch.tensor([[0.0, 2.5, 0.0], [0.0, -2.5, 0.0], [0.0, 0.0, 2.5]])
    cams = look_at_cameras(eyes, image_size=32)
    for tensor in (cams.R, cams.T, cams.focal):
        assert bool(torch.isfinite(tensor).all())
    uv, _ = cams.project(torch.zeros(1, 3))
    assert torch.allclose(uv[:, 0], torch.full((3, 2), 16.0), atol=1e-4)
    assert torch.allclose(torch.linalg.det(cams.R), torch.ones(3), atol=1e-5)


def test_camera_input_errors() -> None:
    with pytest.raises(ValueError, match="coincides"):
        look_at_cameras(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="fov_deg"):
        look_at_cameras(torch.ones(1, 3), fov_deg=180.0)
    with pytest.raises(ValueError, match="Cameras.T"):
        Cameras(torch.eye(3)[None], torch.zeros(2, 3), torch.ones(1), 8)
    cams = look_at_cameras(torch.ones(2, 3), image_size=8)
    with pytest.raises(ValueError, match="uv must be"):
        cams.unproject(torch.zeros(3, 4, 2), torch.ones(3, 4))
    assert len(cams[1]) == 1 and torch.equal(cams[1].R, cams.R[1:2])


# ------------------------------------------------------------------------------------- layouts
def test_ring_layout_26_distinct_views() -> None:
    eyes = _sphere26(distance=2.5, pole_tilt_deg=5.0)
    assert eyes.shape == (26, 3)
    assert torch.allclose(eyes.norm(dim=-1), torch.full((26,), 2.5), atol=1e-5)
    polar = torch.rad2deg(torch.acos(eyes[:, 1] / 2.5))
    assert torch.allclose(polar[:24], torch.tensor([45.0, 90.0, 135.0]).repeat_interleave(8), atol=1e-3)
    assert torch.allclose(polar[24:], torch.tensor([5.0, 175.0]), atol=1e-3)
    azimuth = torch.rad2deg(torch.atan2(eyes[:8, 0], eyes[:8, 2])) % 360
    assert torch.allclose(azimuth, torch.arange(8.0) * 45, atol=1e-3)
    directions = eyes / eyes.norm(dim=-1, keepdim=True)
    cosine = directions @ directions.T - 2 * torch.eye(26)
    # Closest pairs: neighbouring azimuths on the 45/135 rings, acos(0.5 + 0.5 cos 45) = 31.4 degrees.
    assert math.degrees(math.acos(float(cosine.max()))) == pytest.approx(31.4, abs=0.1)
    cams = look_at_cameras(eyes)
    assert bool(torch.isfinite(cams.R).all()) and bool(torch.isfinite(cams.T).all())


def test_ring_layout_hand_worked_eyes_and_errors() -> None:
    """Azimuth about +y from +z, polar from +y: (polar 90, az 90) is +x, (polar 60, az 0) is
    (0, cos 60, sin 60) d; no poles without a tilt."""
    eyes = ring_view_layout(((90.0, 4), (60.0, 1)), distance=2.0, pole_tilt_deg=None)
    expected = torch.tensor([[0, 0, 2.0], [2, 0, 0], [0, 0, -2], [-2, 0, 0], [0, 1.0, math.sqrt(3)]])
    assert torch.allclose(eyes, expected, atol=1e-6)
    with_poles = ring_view_layout(((90.0, 4),), distance=2.0, pole_tilt_deg=10.0)
    tilt = math.radians(10.0)
    poles = torch.tensor(
        [[0, 2 * math.cos(tilt), 2 * math.sin(tilt)], [0, -2 * math.cos(tilt), 2 * math.sin(tilt)]]
    )
    assert torch.allclose(with_poles[4:], poles, atol=1e-6)
    for bad in (dict(distance=0.0), dict(pole_tilt_deg=0.0), dict(rings=((90.0, 0),))):
        with pytest.raises(ValueError):
            ring_view_layout(**{"rings": ((90.0, 4),), **bad})


def test_find3d_layout_matches_their_elev_azim() -> None:
    eyes = find3d_view_layout(10, distance=3.0)
    assert eyes.shape == (10, 3)
    elevation = torch.rad2deg(torch.asin(eyes[:, 1] / 3.0))
    assert torch.allclose(elevation, torch.tensor([30.0, -20.0] * 5), atol=1e-4)
    azimuth = torch.rad2deg(torch.atan2(eyes[:, 0], eyes[:, 2]))
    expected = torch.linspace(-180, 180, 11)[:-1]
    # -180 and +180 are the same azimuth; compare on the circle.
    assert torch.allclose(torch.cos(torch.deg2rad(azimuth - expected)), torch.ones(10), atol=1e-6)
    # PyTorch3D's look_at_view_transform placement, as Find3D uses it.
    from pytorch3d.renderer import look_at_view_transform

    R, T = look_at_view_transform(3.0, torch.tensor([30.0, -20.0] * 5), expected)
    p3d_centres = -(R @ T[..., None]).squeeze(-1)  # PyTorch3D: x_view = x_world R + T
    assert torch.allclose(eyes, p3d_centres, atol=1e-4)
    directions = eyes / 3.0
    assert (directions @ directions.T - 2 * torch.eye(10)).max() < 0.99
    cams = find3d_cameras(image_size=64)
    assert len(cams) == 10 and bool(torch.isfinite(cams.R).all())
    with pytest.raises(ValueError):
        find3d_view_layout(0)


# ------------------------------------------------------------------------ meshes: known geometry
@pytest.mark.parametrize("backend", BACKENDS)
def test_frontal_quad_has_exact_depth(backend: str) -> None:
    vertices, faces = _grid_plane(n=2, half=3.0)
    # Shifted off the axis (still perpendicular to the plane) so the triangles' diagonals do not pass
    # exactly through pixel centres, which PyTorch3D's strict inside test leaves empty.
    shift = torch.tensor([0.01, 0.02, 0.0])
    eyes = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -2.0]]) + shift
    cams = look_at_cameras(eyes, at=shift, fov_deg=60.0, image_size=32)
    out = render_mesh(vertices, faces, cams, backend=backend)
    # The quad's half-width 3 at depth <= 3 subtends >= 45 deg > fov / 2: it covers the whole image.
    assert bool(out.mask[0].all()) and bool(out.mask[1].all())
    assert torch.allclose(out.depth[0], torch.full((32, 32), 3.0), atol=1e-5)
    assert torch.allclose(out.depth[1], torch.full((32, 32), 2.0), atol=1e-5)  # seen from behind
    # Headlight on a frontal plane: cosine = |n . d| = view z / |d| per pixel (d has view-z 1).
    directions = cams.pixel_directions()
    expected = 0.15 + 0.6 / directions.norm(dim=-1)
    assert torch.allclose(out.image[..., 0], expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hits_lie_on_the_plane_and_in_the_right_face(backend: str) -> None:
    n = 6
    vertices, faces = _grid_plane(n=n, half=1.0)
    cams = look_at_cameras(torch.tensor([[0.7, 0.9, 2.0], [-1.2, -0.4, 1.6]]), fov_deg=60.0, image_size=48)
    out = render_mesh(vertices, faces, cams, backend=backend)
    assert out.mask.float().mean() > 0.3
    # Every hit, unprojected from its pixel centre and depth, lies on z = 0 ...
    v_idx, row, col = torch.nonzero(out.mask, as_tuple=True)
    uv = torch.stack([col, row], dim=-1).float() + 0.5
    world = torch.cat(
        [
            cams[k].unproject(uv[v_idx == k][None], out.depth[k][out.mask[k]][None])[0]
            for k in range(len(cams))
        ]
    )
    assert world[:, 2].abs().max() < 1e-4
    # ... inside the analytically expected face, and its barycentrics reproduce the point.
    order = torch.argsort(v_idx, stable=True)
    face_hit = out.pix_to_face[v_idx, row, col][order]
    expected_face, edge_distance = _grid_face_of(world)
    interior = edge_distance > 1e-3
    assert bool((face_hit[interior] == expected_face[interior]).all())
    bary = out.bary[v_idx, row, col][order]
    rebuilt = (bary[:, :, None] * vertices[faces[face_hit]]).sum(1)
    assert torch.allclose(rebuilt, world, atol=1e-4)
    assert torch.allclose(bary.sum(-1), torch.ones(len(bary)), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projected_point_lands_in_its_face(backend: str) -> None:
    n = 6
    vertices, faces = _grid_plane(n=n, half=1.0)
    cams = look_at_cameras(torch.tensor([[0.5, -0.8, 2.2], [0.0, 0.0, 2.5]]), fov_deg=55.0, image_size=64)
    gen = torch.Generator().manual_seed(3)
    pts = torch.cat([torch.rand(800, 2, generator=gen) * 1.8 - 0.9, torch.zeros(800, 1)], dim=-1)
    expected_face, edge_distance = _grid_face_of(pts)
    pts, expected_face = pts[edge_distance > 0.05], expected_face[edge_distance > 0.05]  # > 1 px from edges
    uv, _ = cams.project(pts)
    pixel = uv.floor().long()
    out = render_mesh(vertices, faces, cams, backend=backend)
    for k in range(len(cams)):
        inside = ((pixel[k] >= 0) & (pixel[k] < 64)).all(-1)
        assert inside.sum() > 100
        got = out.pix_to_face[k, pixel[k, inside, 1], pixel[k, inside, 0]]
        assert torch.equal(got, expected_face[inside])


# ------------------------------------------------------------------ meshes: backend agreement
def _assert_backends_agree(
    a: Any, b: Any, hit: str, bounds: tuple[float, float, float, float]
) -> torch.Tensor:
    """Two backends' renders of one scene agree: ``bounds = (least coverage of ``a``, least fraction of
    pixels whose mask agrees, least fraction of pixels both cover that hit the same face / point
    (``hit``), most depth difference there)``. Returns the mask of pixels that hit the same thing."""
    coverage, mask_agree, same_hit, depth_tol = bounds
    assert a.mask.float().mean() > coverage
    assert (a.mask == b.mask).float().mean() >= mask_agree
    both = a.mask & b.mask
    same = both & (getattr(a, hit) == getattr(b, hit))
    assert same.sum() / both.sum() >= same_hit
    assert (a.depth - b.depth)[same].abs().max() < depth_tol
    return same


@pytest.mark.parametrize(("name", "size", "n_views"), [("bunny.ply", 64, 3), ("cow.obj", 96, 4)])
def test_embree_and_pytorch3d_agree_on_real_mesh(
    shared_data: Path, name: str, size: int, n_views: int
) -> None:
    vertices, faces = load_mesh_normalized(_meshes_dir(shared_data) / name)
    eyes = _sphere26()[torch.linspace(0, 25, n_views).long()]
    cams = look_at_cameras(eyes, fov_deg=fov_to_fit_unit_sphere(2.5), image_size=size)
    ray = render_mesh(vertices, faces, cams, backend="embree")
    rast = render_mesh(vertices, faces, cams, backend="pytorch3d")
    for out in (ray, rast):
        assert out.pix_to_face.shape == (n_views, size, size) and out.pix_to_face.dtype == torch.long
        assert int(out.pix_to_face.max()) < faces.shape[0]
        assert bool(torch.isinf(out.depth[~out.mask]).all()) and bool((out.image[~out.mask] == 1).all())
        assert bool((out.bary[~out.mask] == 0).all())
    same = _assert_backends_agree(ray, rast, "pix_to_face", (0.1, 0.99, 0.97, 1e-3))
    assert (ray.bary - rast.bary)[same].abs().max() < 1e-3
    assert (ray.image - rast.image)[same].abs().max() < 1e-4
    # Depths are view z: every hit unprojects onto its face (barycentric point) for both backends.
    for out in (ray, rast):
        v_idx, row, col = torch.nonzero(out.mask, as_tuple=True)
        uv = torch.stack([col, row], -1).float() + 0.5
        face_points = (out.bary[out.mask][:, :, None] * vertices[faces[out.pix_to_face[out.mask]]]).sum(1)
        z_view = (cams.R[v_idx] @ face_points[:, :, None]).squeeze(-1)[:, 2] + cams.T[v_idx, 2]
        assert torch.allclose(z_view, out.depth[out.mask], atol=1e-4)
        projected = cams.K[v_idx] @ (cams.R[v_idx] @ face_points[:, :, None] + cams.T[v_idx, :, None])
        projected = projected[:, :2, 0] / projected[:, 2:, 0]
        assert (projected - uv).abs().max() < 1e-2


def _sliver_strip(n: int = 500, width: float = 0.8, length: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A slightly bent strip of 2n long, thin triangles (width/n across, ``length`` long)."""
    x = torch.linspace(-width / 2, width / 2, n + 1)
    bottom = torch.stack([x, torch.full_like(x, -length / 2), 0.1 * x], dim=-1)
    top = torch.stack([x, torch.full_like(x, length / 2), 0.1 * x], dim=-1)
    i = torch.arange(n)
    faces = torch.cat(
        [torch.stack([i, i + 1, n + 1 + i], -1), torch.stack([i + 1, n + 2 + i, n + 1 + i], -1)]
    )
    return torch.cat([bottom, top]), faces


def test_embree_barycentrics_exact_on_sliver_faces() -> None:
    # Each hit's barycentric point must project back onto its pixel centre at its depth. Embree's own
    # float32 barycentrics miss by ~3e-3 px here (1.5-long faces 1.6e-3 wide seen from 2.5 away);
    # the float64 pass is limited only by the float32 outputs (~3e-6 px).
    vertices, faces = _sliver_strip()
    cams = look_at_cameras(torch.tensor([[0.4, 0.2, 2.5]]), fov_deg=50.0, image_size=64)
    out = render_mesh(vertices, faces, cams, backend="embree")
    assert out.mask.float().mean() > 0.15
    _, row, col = torch.nonzero(out.mask, as_tuple=True)
    tri = vertices.double()[faces[out.pix_to_face[out.mask]]]
    points = (out.bary[out.mask].double()[:, :, None] * tri).sum(1)
    cams64 = Cameras(cams.R.double(), cams.T.double(), cams.focal.double(), cams.image_size)
    uv, z = cams64.project(points)
    assert (uv[0] - (torch.stack([col, row], -1).double() + 0.5)).abs().max() < 1e-4
    assert (z[0] - out.depth[out.mask].double()).abs().max() < 1e-5


def test_exact_hits_recover_constructed_intersections() -> None:
    # Rays built to hit random triangles at known (t, b1, b2): the float64 Moller-Trumbore pass must
    # return exactly those.
    rng = np.random.default_rng(5)
    n_faces, n_views, n_rays = 40, 3, 500
    tri = rng.uniform(-1, 1, (n_faces, 3, 3))
    origins = rng.uniform(-3, 3, (n_views, 3))
    view = rng.integers(0, n_views, n_rays)
    face = rng.integers(0, n_faces, n_rays)
    b = rng.uniform(0, 1, (n_rays, 2))
    b = np.where(b.sum(-1, keepdims=True) > 1, 1 - b, b)  # inside the triangle
    point = tri[face, 0] * (1 - b.sum(-1, keepdims=True)) + tri[face, 1] * b[:, :1] + tri[face, 2] * b[:, 1:]
    t = rng.uniform(0.5, 1.5, n_rays)
    directions = (point - origins[view]) / t[:, None]
    face_rows = np.concatenate([tri[face, 0], tri[face, 1] - tri[face, 0], tri[face, 2] - tri[face, 0]], 1).T
    got_t, got_b1, got_b2, _ = mesh_module._exact_hits(origins[view].T, face_rows, list(directions.T))
    np.testing.assert_allclose(got_t, t, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got_b1, b[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got_b2, b[:, 1], rtol=0, atol=1e-9)


def _all_tiles(vertices: np.ndarray, faces: np.ndarray, cameras: Cameras):
    """Every tile of every view: turns the Embree backend into a plain all-pixel ray cast."""
    n_tiles = -(-cameras.image_size // mesh_module._TILE)
    view, row, col = np.meshgrid(
        np.arange(len(cameras)), np.arange(n_tiles), np.arange(n_tiles), indexing="ij"
    )
    return view.reshape(-1), row.reshape(-1) * mesh_module._TILE, col.reshape(-1) * mesh_module._TILE


def test_embree_ray_culling_and_chunking_change_nothing(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vertices, faces = load_mesh_normalized(_meshes_dir(shared_data) / "cow.obj")
    eyes = torch.cat([_sphere26()[::5], torch.tensor([[0.05, 0.1, 0.02], [0.0, 0.0, 1.05]])])
    # 50 px is not a multiple of the tile size; the last two cameras sit inside / at the shape, so faces
    # lie behind them and straddle their image plane.
    cams = look_at_cameras(eyes, at=torch.tensor([0.3, 0.1, 0.0]), fov_deg=80.0, image_size=50)
    # A ceiling (two big triangles at y = 0.5) reaching from behind the camera to far in front: both
    # faces straddle the image plane, and they are all the camera sees above the horizon.
    floor_vertices, floor_faces = _grid_plane(n=1, half=5.0)
    floor_vertices = torch.stack([floor_vertices[:, 0], torch.full((4,), 0.5), floor_vertices[:, 1]], -1)
    floor_cams = look_at_cameras(torch.zeros(1, 3), at=torch.tensor([0.0, 0.0, 1.0]), image_size=50)
    cases = [(vertices, faces, cams), (floor_vertices, floor_faces, floor_cams)]
    # Cull even though the cow has more faces than these small images have pixels.
    monkeypatch.setattr(mesh_module, "_CULL_MAX_FACES_PER_PIXEL", 1e9)
    culled = [render_mesh(v, f, c, backend="embree") for v, f, c in cases]
    assert culled[0].mask[-2:].float().mean() > 0.3
    assert 0.2 < culled[1].mask.float().mean() < 0.6
    monkeypatch.setattr(mesh_module, "_candidate_tiles", _all_tiles)
    full = [render_mesh(v, f, c, backend="embree") for v, f, c in cases]
    monkeypatch.setattr(mesh_module, "_MAX_VIEW_FACE_PAIRS", 2 * faces.shape[0] + 1)  # 2 views a group
    monkeypatch.setattr(mesh_module, "_RAY_CHUNK", 100)
    chunked = render_mesh(vertices, faces, cams, backend="embree")
    for name in ("pix_to_face", "depth", "bary", "image", "mask"):
        for a, b in zip(culled, full, strict=True):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(chunked, name), getattr(full[0], name)), name


def test_render_mesh_bad_input() -> None:
    vertices, faces = _grid_plane(n=1)
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, 2.0]]), image_size=8)
    with pytest.raises(ValueError, match="empty mesh"):
        render_mesh(vertices, faces[:0], cams)
    with pytest.raises(ValueError, match="face indices"):
        render_mesh(vertices, faces + 10, cams)
    with pytest.raises(ValueError, match="unknown mesh backend"):
        render_mesh(vertices, faces, cams, backend="opengl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        render_mesh(vertices * float("nan"), faces, cams)


# -------------------------------------------------------------------------------------- points
def test_single_point_disc_known_answer() -> None:
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, 2.0]]), fov_deg=60.0, image_size=64)
    point = torch.tensor([[0.1, -0.05, 0.0]])
    radius = 0.15
    out = render_points(point, cams, radius=radius, backend="cpu")
    (uv,), (z,) = (t[0] for t in cams.project(point))
    radius_px = radius * cams.focal[0] / 2.0
    centres = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="xy"), -1) + 0.5
    expected = ((centres - uv) ** 2).sum(-1) < radius_px**2  # (row, col) grid of pixel centres
    assert torch.equal(out.mask[0], expected)
    assert expected.sum() > 20
    assert torch.allclose(out.depth[0][expected], torch.full((int(expected.sum()),), 2.0))
    assert bool((out.pix_to_point[0][expected] == 0).all())


def test_points_cpu_matches_pytorch3d(shared_data: Path) -> None:
    vertices, _ = load_mesh_normalized(_meshes_dir(shared_data) / "bunny.ply")
    pts = vertices[torch.randperm(vertices.shape[0], generator=torch.Generator().manual_seed(0))[:2000]]
    cams = look_at_cameras(_sphere26()[::3], fov_deg=fov_to_fit_unit_sphere(2.5), image_size=48)
    for radius in (0.015, 0.04):
        cpu = render_points(pts, cams, radius=radius, backend="cpu")
        p3d = render_points(pts, cams, radius=radius, backend="pytorch3d")
        _assert_backends_agree(cpu, p3d, "pix_to_point", (0.05, 0.995, 0.99, 1e-4))
        # The reported depth is the winning point's view z.
        _, z = cams.project(pts)
        v_idx = torch.nonzero(cpu.mask, as_tuple=True)[0]
        assert torch.allclose(cpu.depth[cpu.mask], z[v_idx, cpu.pix_to_point[cpu.mask]])


def test_points_chunking_gives_identical_result(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    pts = torch.randn(400, 3, generator=gen) * 0.5
    pts = torch.cat([pts, pts[:50]])  # exact duplicates: depth ties must go to the lower index
    cams = look_at_cameras(find3d_view_layout(4), image_size=40)
    whole = render_points(pts, cams, radius=0.05, backend="cpu")
    monkeypatch.setattr(points_module, "_MAX_CANDIDATES", 500)
    chunked = render_points(pts, cams, radius=0.05, backend="cpu")
    assert torch.equal(whole.pix_to_point, chunked.pix_to_point)
    assert torch.equal(whole.depth, chunked.depth)
    assert int(whole.pix_to_point.max()) < 400  # duplicates (index >= 400) never win a tie


def test_points_behind_camera_and_bad_input() -> None:
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, 2.0]]), image_size=16)
    behind = torch.tensor([[0.0, 0.0, 3.0]])
    for backend in ("cpu", "pytorch3d"):
        assert not bool(render_points(behind, cams, 0.1, backend=backend).mask.any())
    with pytest.raises(ValueError, match="radius"):
        render_points(behind, cams, radius=0.0)
    with pytest.raises(ValueError, match="empty"):
        render_points(torch.zeros(0, 3), cams)
    with pytest.raises(ValueError, match="colors"):
        render_points(behind, cams, colors=torch.zeros(2, 3))
    colored = render_points(torch.zeros(1, 3), cams, 0.2, colors=torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.equal(colored.image[0, 8, 8], torch.tensor([1.0, 0.0, 0.0]))


# ------------------------------------------------------------------------ GPU bin sizing (on CPU)
def _views_for_bins(size: int) -> Cameras:
    # Off-centre look-at and a tight fov so parts of the shape fall outside the image too.
    eyes = _sphere26()[[0, 9, 25]] * 0.9
    return look_at_cameras(eyes, at=torch.tensor([0.2, 0.1, 0.0]), fov_deg=40.0, image_size=size)


@pytest.mark.parametrize(("size", "bin_size"), [(128, 16), (100, 16)])  # 100: b does not divide S
def test_face_bin_counts_bound_pytorch3d_coarse_pass(shared_data: Path, size: int, bin_size: int) -> None:
    from pytorch3d import _C
    from pytorch3d.renderer import MeshRasterizer
    from pytorch3d.structures import Meshes

    from patchalign.render.binning import bin_counts, max_per_bin
    from patchalign.render.mesh import face_screen_boxes, to_pytorch3d_cameras

    vertices, faces = load_mesh_normalized(_meshes_dir(shared_data) / "cow.obj")
    cams = _views_for_bins(size)
    meshes = Meshes(verts=[vertices] * 3, faces=[faces] * 3)
    proj = MeshRasterizer(cameras=to_pytorch3d_cameras(cams)).transform(meshes)
    args = (
        proj.verts_packed()[proj.faces_packed()],
        proj.mesh_to_faces_packed_first_idx(),
        proj.num_faces_per_mesh(),
        (size, size),
        0.0,
        bin_size,
    )
    # PyTorch3D's own coarse pass (CPU) with room for every face: the true per-bin occupancy.
    true = (_C._rasterize_meshes_coarse(*args, faces.shape[0]) >= 0).sum(-1)
    lo, hi = face_screen_boxes(vertices, faces, cams)
    ours = bin_counts(lo, hi, size, bin_size)
    assert ours.shape == true.shape
    assert bool((ours >= true).all())  # an upper bound in every bin ...
    assert ours.max() <= 1.3 * true.max()  # ... and a tight one
    _C._rasterize_meshes_coarse(*args, max_per_bin(lo, hi, size, bin_size))  # raises on overflow
    with pytest.raises(RuntimeError, match="too many faces"):
        _C._rasterize_meshes_coarse(*args, int(true.max()) - 1)


def test_point_bin_counts_bound_pytorch3d_coarse_pass(shared_data: Path) -> None:
    from pytorch3d import _C
    from pytorch3d.renderer import PointsRasterizer
    from pytorch3d.structures import Pointclouds

    from patchalign.render.binning import bin_counts
    from patchalign.render.mesh import to_pytorch3d_cameras

    vertices, _ = load_mesh_normalized(_meshes_dir(shared_data) / "bunny.ply")
    size, bin_size = 100, 16
    cams = _views_for_bins(size)
    uv, z = cams.project(vertices)
    radius_px = 0.02 * cams.focal[:, None] / z
    clouds = PointsRasterizer(cameras=to_pytorch3d_cameras(cams)).transform(
        Pointclouds(points=vertices[None].expand(3, -1, -1))
    )
    true = _C._rasterize_points_coarse(
        clouds.points_packed(),
        clouds.cloud_to_packed_first_idx(),
        clouds.num_points_per_cloud(),
        (size, size),
        (radius_px * 2 / size).reshape(-1),
        bin_size,
        vertices.shape[0],
    )
    true = (true >= 0).sum(-1)
    reach = (radius_px + 1)[..., None]
    ours = bin_counts(uv - reach, uv + reach, size, bin_size)
    assert bool((ours >= true).all()) and ours.max() <= 1.3 * true.max()


# ------------------------------------------------------------------------------------- loading
def test_load_mesh_normalized_real_files(shared_data: Path) -> None:
    import trimesh

    meshes = _meshes_dir(shared_data)
    for name in ("cow.obj", "bunny.ply", "CesiumMilkTruck.glb"):
        vertices, faces = load_mesh_normalized(meshes / name)
        assert vertices.dtype == torch.float32 and faces.dtype == torch.long
        assert vertices.norm(dim=-1).max() == pytest.approx(1.0, abs=1e-5)
        centre = (vertices.min(0).values + vertices.max(0).values) / 2
        assert centre.abs().max() < 1e-5
    scene = trimesh.load(meshes / "CesiumMilkTruck.glb")
    assert len(scene.geometry) > 1
    # Scene merged: every node's triangles are there (nodes may instance a geometry several times).
    node_faces = sum(len(scene.geometry[scene.graph[node][1]].faces) for node in scene.graph.nodes_geometry)
    assert faces.shape[0] == node_faces


def test_load_mesh_normalized_returns_its_transform(tmp_path: Path, shared_data: Path) -> None:
    # Box [1,5] x [2,4] x [3,3] plus an unreferenced far vertex (ignored): centre (3,3,3), and the
    # farthest corner sits at sqrt(2^2 + 1^2) from it.
    (tmp_path / "box.obj").write_text("v 1 2 3\nv 5 2 3\nv 5 4 3\nv 1 4 3\nv 100 100 100\nf 1 2 3\nf 1 3 4\n")
    vertices, faces = load_mesh_normalized(tmp_path / "box.obj")  # default: two values, as before
    v2, f2, transform = load_mesh_normalized(tmp_path / "box.obj", return_transform=True)
    assert torch.equal(vertices, v2) and torch.equal(faces, f2)
    assert isinstance(transform, MeshNormalization)
    centre, scale = transform  # unpacks as (centre, scale)
    assert centre.shape == (3,) and isinstance(scale, float)
    assert torch.allclose(centre, torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))
    assert scale == pytest.approx(math.sqrt(5.0))
    original = torch.tensor([[1.0, 2, 3], [5, 2, 3], [5, 4, 3], [1, 4, 3]])
    assert torch.allclose(transform.to_original(vertices[:4]), original, atol=1e-6)
    assert torch.allclose(vertices[:4] * scale + centre.float(), original, atol=1e-6)
    assert torch.allclose(transform.to_normalized(original), vertices[:4], atol=1e-7)
    # A real file: the file's own vertices are recovered through the transform.
    import trimesh

    path = _meshes_dir(shared_data) / "cow.obj"
    vertices, _, transform = load_mesh_normalized(path, return_transform=True)
    raw = torch.from_numpy(trimesh.load(path, force="mesh", process=False).vertices)
    assert torch.allclose(transform.to_original(vertices.double()), raw, atol=1e-5 * transform.scale)


def test_load_mesh_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_mesh_normalized(tmp_path / "missing.obj")
    with pytest.raises(FileNotFoundError):
        load_mesh_normalized(tmp_path / "missing.obj")
    (tmp_path / "empty.obj").write_text("")
    with pytest.raises(MeshLoadError, match="no triangles"):
        load_mesh_normalized(tmp_path / "empty.obj")
    (tmp_path / "cloud.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "end_header\n0 0 0\n1 0 0\n0 1 0\n"
    )
    with pytest.raises(MeshLoadError, match="no triangles"):
        load_mesh_normalized(tmp_path / "cloud.ply")
    (tmp_path / "bad.glb").write_bytes(b"not a glb file")
    with pytest.raises(MeshLoadError, match="could not load"):
        load_mesh_normalized(tmp_path / "bad.glb")
    (tmp_path / "point.obj").write_text("v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n")
    with pytest.raises(MeshLoadError, match="zero extent"):
        load_mesh_normalized(tmp_path / "point.obj")


# ------------------------------------------------------------------------------- bench / GPU
def test_bench_render_small(shared_data: Path) -> None:
    cow = _meshes_dir(shared_data) / "cow.obj"
    result = bench_render(image_size=24, n_views=2, mesh_path=cow, repeats=1)
    assert result["embree_ms_per_view"] > 0 and result["pytorch3d_cpu_ms_per_view"] > 0
    assert result["agreement_cpu"]["mask_agreement"] >= 0.99
    result = bench_render(image_size=16, mesh_path=cow, repeats=2, pytorch3d_cpu=False, layout="zerokey")
    assert result["n_views"] == 26 and result["embree_median_ms_per_view"] >= result["embree_ms_per_view"]
    points = bench_points(image_size=16, n_points=300, radius=0.05, mesh_path=cow, repeats=1)
    assert points["n_points"] == 300 and points["n_views"] == 26
    assert points["points_cpu_ms_per_view"] > 0 and 0 < points["foreground_fraction"] < 1


@pytest.mark.gpu
def test_cuda_pytorch3d_matches_embree(shared_data: Path) -> None:
    vertices, faces = load_mesh_normalized(_meshes_dir(shared_data) / "cow.obj")
    cams = find3d_cameras(image_size=256)
    ray = render_mesh(vertices, faces, cams, backend="embree")
    rast = render_mesh(vertices.cuda(), faces.cuda(), cams, backend="auto")
    assert rast.pix_to_face.is_cuda
    both = ray.mask & rast.mask.cpu()
    assert (ray.mask == rast.mask.cpu()).float().mean() >= 0.99
    same = both & (ray.pix_to_face == rast.pix_to_face.cpu())
    assert same.sum() / both.sum() >= 0.97
    assert (ray.depth - rast.depth.cpu())[same].abs().max() < 1e-3
    pts = vertices.cuda()
    cpu_pts = render_points(pts, cams, 0.01, backend="cpu")
    gpu_pts = render_points(pts, cams, 0.01, backend="auto")
    assert (cpu_pts.mask == gpu_pts.mask).float().mean() >= 0.995
