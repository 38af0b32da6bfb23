"""Mesh rendering with face correspondences: Embree ray casting (CPU) or PyTorch3D rasterization.

Both backends answer the same question for every pixel centre of every view -- which face does the
camera ray hit first, where (barycentrics), and at which view depth -- and shade with the same
headlight formula, so their outputs are interchangeable (the tests check they agree pixel for pixel
away from silhouettes). Embree is the fast CPU path (rays only where the mesh can be, exact hits in
float64: ~13 ms per 448 px view of a 6k-face mesh on one core); PyTorch3D is the GPU path.
``backend="auto"`` picks by the device of the vertices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from patchalign.render._buffers import cpu_full, cpu_nonnegative
from patchalign.render.binning import coarse_bin_size, max_per_bin
from patchalign.render.cameras import Cameras

__all__ = ["RenderOutput", "render_mesh", "shade_faces", "face_normals"]

MeshBackend = Literal["auto", "embree", "pytorch3d"]

# Headlight shading: ambient + diffuse * |n . view| on a grey material; white background. The ambient
# term keeps grazing surfaces distinguishable from the background for the 2D models fed these images.
AMBIENT = 0.15
DIFFUSE = 0.6
BACKGROUND = 1.0


@dataclass(eq=False)
class RenderOutput:
    """Per-pixel render results for V views of one mesh.

    Attributes:
        image: (V,H,W,3) float in [0,1]; grey headlight-shaded mesh on white.
        pix_to_face: (V,H,W) long index into this mesh's faces (not packed across views); -1 = background.
        depth: (V,H,W) float view-space z of the hit; +inf = background.
        bary: (V,H,W,3) barycentric coordinates of the hit in its face (weights of face vertices 0,1,2);
            0 for background.
        mask: (V,H,W) bool foreground.
    """

    image: Tensor
    pix_to_face: Tensor
    depth: Tensor
    bary: Tensor
    mask: Tensor


def _check_mesh(vertices: Tensor, faces: Tensor) -> None:
    if vertices.ndim != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (N,3), got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F,3), got {tuple(faces.shape)}")
    if faces.shape[0] == 0 or vertices.shape[0] == 0:
        raise ValueError("cannot render an empty mesh (no faces or no vertices)")
    if faces.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}")
    if int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]:
        raise ValueError(
            f"face indices must lie in [0, {vertices.shape[0]}); got [{faces.min()}, {faces.max()}]"
        )
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("vertices contain NaN or inf")


def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """(F,3) unit face normals (zero for degenerate faces), right-hand rule on the vertex order."""
    tri = vertices[faces]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    return normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def shade_faces(
    pix_to_face: Tensor, normals: Tensor, cameras: Cameras, directions: Tensor | None = None
) -> Tensor:
    """Headlight Lambertian shading shared by every backend: (V,H,W) face ids -> (V,H,W,3) image.

    The light sits at the camera, so the cosine term is ``|n . d|`` with ``d`` the unit pixel ray:
    absolute value because meshes in the wild have inconsistent winding (treated as double-sided).
    ``directions`` are ``cameras.pixel_directions()`` when the caller already has them. The Embree path
    computes the same grey level for its hit pixels only, from its float64 intersection pass.
    """
    if directions is None:
        directions = cameras.pixel_directions()
    directions = directions.to(normals)
    mask = pix_to_face >= 0
    n = normals[pix_to_face.clamp_min(0)]
    cosine = (n * directions).sum(-1).abs() / directions.norm(dim=-1)
    grey = torch.where(mask, AMBIENT + DIFFUSE * cosine, BACKGROUND)
    return grey.unsqueeze(-1).expand(*grey.shape, 3).contiguous()


def render_mesh(
    vertices: Tensor,
    faces: Tensor,
    cameras: Cameras,
    backend: MeshBackend = "auto",
) -> RenderOutput:
    """Render one mesh from every camera view and return per-pixel face correspondences.

    Args:
        vertices: (N,3) float vertex positions (world frame).
        faces: (F,3) integer vertex indices.
        cameras: V cameras (see :mod:`patchalign.render.cameras` for the pixel convention).
        backend: ``"embree"`` (CPU ray casting), ``"pytorch3d"`` (rasterization on the vertices'
            device) or ``"auto"``: PyTorch3D for CUDA tensors, Embree otherwise.

    Returns:
        A :class:`RenderOutput` on the vertices' device. Faces are double-sided (no back-face culling),
        one face per pixel, sampled at pixel centres.

    The backends agree when the mesh lies in front of every camera (cameras outside the shape, as in
    all our view layouts). A face straddling a camera plane is clipped correctly by Embree's ray cast
    but not by PyTorch3D, which we run without near-plane clipping (it would re-index faces and cost a
    pass over all of them on every call).
    """
    _check_mesh(vertices, faces)
    if backend == "auto":
        backend = "pytorch3d" if vertices.is_cuda else "embree"
    device = vertices.device
    vertices = vertices.to(torch.float32)
    faces = faces.to(device=device, dtype=torch.long)
    cameras = cameras.to(device)
    if backend not in ("embree", "pytorch3d"):
        raise ValueError(f"unknown mesh backend {backend!r}; expected 'auto', 'embree' or 'pytorch3d'")
    if backend == "embree":
        pix_to_face, depth, bary, image = _raycast_embree(vertices, faces, cameras)
    else:
        pix_to_face, depth, bary = _rasterize_pytorch3d(vertices, faces, cameras)
        image = shade_faces(pix_to_face, face_normals(vertices, faces), cameras)
    return RenderOutput(
        image=image, pix_to_face=pix_to_face, depth=depth, bary=bary, mask=cpu_nonnegative(pix_to_face)
    )


# ---------------------------------------------------------------------------------------------- Embree
# Candidate rays are chosen on a grid of _TILE x _TILE pixel tiles (see _candidate_tiles); a power of 2.
_TILE = 4
# At most this many (view, face) pairs go through _candidate_tiles at once (bounds its memory on dense
# meshes; cow.obj x 26 views is one group).
_MAX_VIEW_FACE_PAIRS = 1 << 21
# Rays handled per Embree call and float64 pass.
_RAY_CHUNK = 1 << 16
# Beyond this many faces per pixel of a view, face boxes cost more than the rays they save (~60 ns per
# face and view vs ~50 ns per missing ray on 3/4 of the pixels, measured at 448 px): cast every pixel.
_CULL_MAX_FACES_PER_PIXEL = 0.5


def _raycast_embree(
    vertices: Tensor, faces: Tensor, cameras: Cameras
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Embree ray casting through the pixel centres that can see the mesh, then exact hits in float64.

    Returns dense (V,H,W) ``pix_to_face``, ``depth``, (V,H,W,3) ``bary`` and the shaded image.

    Why it is fast (measured on cow.obj, 26 views, 448 px; see ``bench.py``):

    * Only pixels inside the union of the faces' (dilated) screen boxes get a ray, rounded out to
      4 x 4 tiles (:func:`_candidate_tiles`): about a quarter of the image for a unit-sphere shape,
      and a ray that misses costs Embree's loop about a quarter of a hit. (On meshes with more faces
      than half the pixels of a view the boxes cost more than the rays they save, and every pixel
      gets a ray.)
    * Embree (float32) only decides *which* face each ray hits first; the hit (depth, barycentrics,
      shading) is recomputed in float64 Moller-Trumbore for hit rays only (:func:`_exact_hits`).
      Embree's own float32 barycentrics are off by up to 3e-2 on the sliver faces of real meshes.
    * Rays go through in chunks of ``_RAY_CHUNK`` whose temporaries stay in cache, one numpy array
      per vector component (numpy is slow on arrays with a trailing axis of 3), single-threaded:
      dozens of mid-sized ops per chunk gain little from torch's two-thread ops and lose a lot when
      another process holds a core (each op then waits for a descheduled worker; measured 10x slower
      medians on a busy 2-core machine).
    * The dense outputs are allocated by numpy, which backs them with huge pages (``_buffers.py``).
    """
    from embreex import rtcore_scene
    from embreex.mesh_construction import TriangleMesh

    out_device = vertices.device
    n_views, size = len(cameras), cameras.image_size
    n_pixels = n_views * size * size
    verts = vertices.detach().cpu().contiguous().numpy()
    faces_np = faces.detach().cpu().numpy()
    # Rays are built in the cameras' precision and rounded to float32 for Embree; the float64 pass uses
    # those float32 directions but the camera centres at full precision.
    R = cameras.R.detach().cpu().numpy()
    focal = cameras.focal.detach().cpu().numpy()
    exact_centres = cameras.centers.detach().cpu()
    centres = exact_centres.to(torch.float32).numpy()  # (V,3) ray origins for Embree
    exact_centres = np.ascontiguousarray(exact_centres.to(torch.float64).numpy().T)  # (3,V)

    # Robust (watertight) traversal: rays through a shared edge or vertex hit one of its faces instead of
    # leaking through as background speckles; costs ~10-30% ray-cast time.
    scene = rtcore_scene.EmbreeScene(robust=True)
    TriangleMesh(scene, verts, faces_np.astype(np.int32))
    tri = verts.astype(np.float64)[faces_np]  # (F,3,3)
    edge1, edge2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    # Per face, one row per component: v0, e1, e2, and 1 / |e1 x e2| for shading (|n . d| = |det| / that
    # norm, det = e1 . (d x e2); zero for degenerate faces, as face_normals gives them a zero normal).
    double_area = np.linalg.norm(np.cross(edge1, edge2), axis=-1)
    inv_double_area = np.divide(1.0, double_area, out=np.zeros_like(double_area), where=double_area > 0)
    face_table = np.ascontiguousarray(
        np.concatenate([tri[:, 0], edge1, edge2, inv_double_area[:, None]], 1).T
    )

    pix_to_face = cpu_full((n_pixels,), -1, torch.long)
    depth = cpu_full((n_pixels,), float("inf"), torch.float32)
    bary = cpu_full((n_pixels, 3), 0.0, torch.float32)
    image = cpu_full((n_pixels, 3), BACKGROUND, torch.float32)
    # Written through numpy views of the same memory.
    pix_to_face_np, depth_np, bary_np, image_np = (t.numpy() for t in (pix_to_face, depth, bary, image))
    n_faces = faces_np.shape[0]
    tile_area = _TILE * _TILE
    tiles_per_chunk = max(1, _RAY_CHUNK // tile_area)
    step = np.arange(_TILE)
    if n_faces > _CULL_MAX_FACES_PER_PIXEL * size * size:
        tile_view, tile_row, tile_col = _all_tiles(n_views, size)
    else:
        group = max(1, _MAX_VIEW_FACE_PAIRS // n_faces)
        parts = []
        for first in range(0, n_views, group):
            view, row, col = _candidate_tiles(verts, faces_np, cameras[first : first + group])
            parts.append((view + first, row, col))
        tile_view, tile_row, tile_col = (np.concatenate(part) for part in zip(*parts, strict=True))
    for start in range(0, tile_view.shape[0], tiles_per_chunk):
        chunk = slice(start, start + tiles_per_chunk)
        view, row, col = tile_view[chunk], tile_row[chunk], tile_col[chunk]
        rows = row[:, None, None] + step[None, :, None]  # (T,TILE,1)
        cols = col[:, None, None] + step[None, None, :]  # (T,1,TILE)
        # Ray directions through the pixel centres with unit view-z (ray parameter = view depth):
        # x * right + y * down + forward, the formula of Cameras.pixel_directions, per tile by
        # broadcasting.
        tile_focal = focal[view][:, None, None]
        x = (cols.astype(R.dtype) + 0.5 - cameras.principal_point) / tile_focal
        y = (rows.astype(R.dtype) + 0.5 - cameras.principal_point) / tile_focal
        r = R[view][:, None, None]  # (T,1,1,3,3)
        components = [
            (x * r[..., 0, k] + y * r[..., 1, k] + r[..., 2, k]).astype(np.float32).reshape(-1)
            for k in range(3)
        ]
        # |d| = sqrt(x^2 + y^2 + 1) (R is a rotation), for shading.
        length = np.sqrt(x * x + y * y + 1.0).reshape(-1)
        pixel = ((view[:, None, None] * size + rows) * size + cols).reshape(-1)
        ray_view = np.repeat(view, tile_area)
        if size % _TILE:  # edge tiles reach past the image
            inside = ((rows < size) & (cols < size)).reshape(-1)
            components = [d[inside] for d in components]
            length, pixel, ray_view = length[inside], pixel[inside], ray_view[inside]
        hit_face = scene.run(centres[ray_view], np.stack(components, axis=-1))
        hit = np.flatnonzero(hit_face >= 0)
        if hit.size == 0:
            continue
        face = hit_face[hit].astype(np.int64)
        pixel = pixel[hit]
        origins = np.take(exact_centres, ray_view[hit], axis=1)
        hit_table = np.take(face_table, face, axis=1)
        t, b1, b2, det = _exact_hits(origins, hit_table, [d[hit] for d in components])
        pix_to_face_np[pixel] = face
        depth_np[pixel] = t
        grey = AMBIENT + DIFFUSE * np.abs(det) * hit_table[9] / length[hit]
        # Column by column: fancy row assignment of (H,3) blocks is slower.
        for channel, value in enumerate((1.0 - b1 - b2, b1, b2)):
            bary_np[pixel, channel] = value
            image_np[pixel, channel] = grey
    shape = (n_views, size, size)
    return (
        pix_to_face.reshape(shape).to(out_device),
        depth.reshape(shape).to(out_device),
        bary.reshape(*shape, 3).to(out_device),
        image.reshape(*shape, 3).to(out_device),
    )


def _all_tiles(n_views: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(view, first row, first column) of every _TILE x _TILE tile of every view."""
    n_tiles = -(-size // _TILE)
    tiles = np.arange(n_views * n_tiles * n_tiles)
    return tiles // (n_tiles * n_tiles), (tiles // n_tiles) % n_tiles * _TILE, tiles % n_tiles * _TILE


def _candidate_tiles(
    vertices: np.ndarray, faces: np.ndarray, cameras: Cameras
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The _TILE x _TILE pixel tiles whose pixel-centre rays may hit a face: a superset of the hits.

    A pixel can only be hit by a face whose screen bounding box (dilated by one pixel against rounding)
    contains its centre. The union of the boxes is counted per tile with a 2D difference array (+-1 at
    box corners, then prefix sums). Faces entirely behind a camera are skipped (a forward ray cannot
    reach them); faces straddling its plane project unboundedly and cover the whole image.

    Returns:
        (view, first row, first column) of every covered tile (int64), view-major then row-major.
    """
    n_views, size = len(cameras), cameras.image_size
    R = cameras.R.detach().cpu().numpy()
    T = cameras.T.detach().cpu().numpy()
    focal = cameras.focal.detach().cpu().numpy()
    # View coordinates and pixel coordinates, one (V,N) array per component.
    x_view = np.matmul(R, vertices.T.astype(R.dtype)) + T[:, :, None]  # (V,3,N)
    z = x_view[:, 2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = focal[:, None] / z
        pixel_uv = [x_view[:, k] * scale + cameras.principal_point for k in range(2)]
    corner = [np.take(z, faces[:, k], axis=1) for k in range(3)]  # (V,F) each
    in_front = (corner[0] > 0) & (corner[1] > 0) & (corner[2] > 0)
    straddles = ~in_front & ((corner[0] >= 0) | (corner[1] >= 0) | (corner[2] >= 0))
    n_tiles = -(-size // _TILE)
    side = n_tiles + 1
    # Difference-array slots (view, tile row, tile column); faces that cover nothing go to a dummy slot.
    dummy = n_views * side * side
    base = np.arange(n_views)[:, None] * (side * side)
    tile_range = []
    with np.errstate(invalid="ignore"):
        for k in range(2):  # column (u), then row (v)
            corner = [np.take(pixel_uv[k], faces[:, j], axis=1) for j in range(3)]
            lo = np.minimum(np.minimum(corner[0], corner[1]), corner[2]) - 1.0
            hi = np.maximum(np.maximum(corner[0], corner[1]), corner[2]) + 1.0
            # Pixels j with centre j + 0.5 in [lo, hi], clipped to the image; then their tiles.
            first = np.where(straddles, 0.0, np.clip(np.ceil(lo - 0.5), 0, size))
            last = np.where(straddles, size - 1.0, np.clip(np.floor(hi - 0.5), -1, size - 1))
            in_front &= first <= last  # NaN boxes (faces behind the camera) compare False
            # Tiles [first, last) as integer-valued floats (exact: _TILE is a power of two; a float
            # floor division would be ~20x slower).
            tile_range.append((np.floor(first * (1.0 / _TILE)), np.floor(last * (1.0 / _TILE)) + 1))
    keep = in_front | straddles
    (col0, col1), (row0, row1) = tile_range
    diff = np.zeros(dummy + 1, dtype=np.int64)
    for rows, cols, sign in ((row0, col0, 1), (row0, col1, -1), (row1, col0, -1), (row1, col1, 1)):
        slot = np.where(keep, base + rows * side + cols, dummy).astype(np.int64)  # float64: exact
        diff += sign * np.bincount(slot.reshape(-1), minlength=dummy + 1)
    # Prefix sums along columns, then rows (numpy's cumsum is fastest on int32 along the last axis).
    counts = np.cumsum(diff[:dummy].astype(np.int32).reshape(n_views, side, side), axis=2, dtype=np.int32)
    covered = np.cumsum(counts, axis=1, dtype=np.int32)[:, :n_tiles, :n_tiles] > 0
    tiles = np.flatnonzero(covered)
    return tiles // (n_tiles * n_tiles), (tiles // n_tiles) % n_tiles * _TILE, tiles % n_tiles * _TILE


def _exact_hits(
    origins: np.ndarray, faces: np.ndarray, directions: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float64 Moller-Trumbore for H rays known to hit: ray parameter t, barycentric weights (b1, b2)
    of vertices 1 and 2 (vertex 0 gets 1 - b1 - b2) and ``det = e1 . (d x e2)`` (for shading).

    Args:
        origins: (3,H) ray origins.
        faces: (>=9,H) rows v0 (3), e1 = v1 - v0 (3), e2 = v2 - v0 (3) of each hit face.
        directions: the x, y, z components of the ray directions, (H,) each (used in float64).

    One array per component throughout: numpy is several times slower on (H,3) arrays.
    """
    dx, dy, dz = (d.astype(np.float64) for d in directions)
    sx, sy, sz = origins[0] - faces[0], origins[1] - faces[1], origins[2] - faces[2]
    e1x, e1y, e1z, e2x, e2y, e2z = faces[3:9]
    px, py, pz = dy * e2z - dz * e2y, dz * e2x - dx * e2z, dx * e2y - dy * e2x  # d x e2
    det = e1x * px + e1y * py + e1z * pz
    # A ray Embree reports as hitting is never exactly parallel to the face; guard degenerate faces.
    tiny = np.finfo(np.float64).tiny
    det = np.where(np.abs(det) < tiny, tiny, det)
    inv_det = 1.0 / det
    qx, qy, qz = sy * e1z - sz * e1y, sz * e1x - sx * e1z, sx * e1y - sy * e1x  # s x e1
    b1 = (sx * px + sy * py + sz * pz) * inv_det
    b2 = (dx * qx + dy * qy + dz * qz) * inv_det
    t = (e2x * qx + e2y * qy + e2z * qz) * inv_det
    return t, b1, b2, det


# ------------------------------------------------------------------------------------------- PyTorch3D
def to_pytorch3d_cameras(cameras: Cameras):
    """Our OpenCV-convention cameras as ``pytorch3d.renderer.PerspectiveCameras`` (screen conventions
    handled by ``cameras_from_opencv_projection``: principal point S/2 maps to the image centre)."""
    from pytorch3d.utils import cameras_from_opencv_projection

    size = cameras.image_size
    image_size = torch.tensor([[size, size]], dtype=torch.float32, device=cameras.device)
    return cameras_from_opencv_projection(
        R=cameras.R.to(torch.float32),
        tvec=cameras.T.to(torch.float32),
        camera_matrix=cameras.K.to(torch.float32),
        image_size=image_size.expand(len(cameras), 2),
    )


def face_screen_boxes(vertices: Tensor, faces: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor]:
    """(V,F,2) pixel-space bounding boxes of every face in every view, dilated by one pixel; faces
    with a vertex at or behind the camera plane get the whole image (their projection is unbounded)."""
    uv, z = cameras.project(vertices)
    tri_uv = uv[:, faces]  # (V,F,3,2)
    lo = tri_uv.amin(dim=2) - 1.0
    hi = tri_uv.amax(dim=2) + 1.0
    behind = (z[:, faces] <= 0).any(dim=-1, keepdim=True) | ~torch.isfinite(lo + hi).all(-1, keepdim=True)
    lo = torch.where(behind, torch.zeros_like(lo), lo)
    hi = torch.where(behind, torch.full_like(hi, float(cameras.image_size)), hi)
    return lo, hi


def _rasterize_pytorch3d(vertices: Tensor, faces: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch3D ``MeshRasterizer`` over all views at once (the mesh is batched V times)."""
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
    from pytorch3d.structures import Meshes

    n_views, size = len(cameras), cameras.image_size
    meshes = Meshes(
        verts=vertices[None].expand(n_views, -1, -1),
        faces=faces[None].expand(n_views, -1, -1),
    )
    # Naive rasterization on CPU (PyTorch3D has no binned CPU path). On GPU, coarse-to-fine with PyTorch3D's
    # bin size and a per-bin cap counted from the faces' screen boxes (see binning.py: the default cap
    # overflows silently on dense meshes).
    bin_size, max_faces_per_bin = 0, None
    if vertices.is_cuda:
        bin_size = coarse_bin_size(size)
        lo, hi = face_screen_boxes(vertices, faces, cameras)
        max_faces_per_bin = max_per_bin(lo, hi, size, bin_size)
    settings = RasterizationSettings(
        image_size=size,
        blur_radius=0.0,
        faces_per_pixel=1,
        bin_size=bin_size,
        max_faces_per_bin=max_faces_per_bin,
        perspective_correct=True,  # true 3D barycentrics, as Embree's
        cull_backfaces=False,
    )
    rasterizer = MeshRasterizer(cameras=to_pytorch3d_cameras(cameras), raster_settings=settings)
    fragments = rasterizer(meshes)
    packed = fragments.pix_to_face[..., 0]  # (V,H,W) index into faces_packed
    first_face = meshes.mesh_to_faces_packed_first_idx().to(packed)  # (V,) offset of each view's copy
    hit = packed >= 0
    pix_to_face = torch.where(hit, packed - first_face[:, None, None], torch.full_like(packed, -1))
    depth = torch.where(hit, fragments.zbuf[..., 0], torch.full_like(fragments.zbuf[..., 0], float("inf")))
    bary = torch.where(
        hit[..., None], fragments.bary_coords[..., 0, :], torch.zeros_like(fragments.bary_coords[..., 0, :])
    )
    assert pix_to_face.shape == (n_views, size, size)
    return pix_to_face.long(), depth.float(), bary.float()
