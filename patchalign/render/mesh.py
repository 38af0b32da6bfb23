"""Mesh rendering with face correspondences: Embree ray casting (CPU) or PyTorch3D rasterization.

Both backends answer the same question for every pixel centre of every view -- which face does the
camera ray hit first, where (barycentrics), and at which view depth -- and share the shading code, so
their outputs are interchangeable (the tests check they agree pixel for pixel away from silhouettes).
Embree is the fast CPU path (one batched ray cast for all pixels of all views); PyTorch3D is the GPU
path. ``backend="auto"`` picks by the device of the vertices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

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
    ``directions`` are ``cameras.pixel_directions()`` when the caller already has them.
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
    directions = cameras.pixel_directions()  # (V,H,W,3) rays with unit view-z, reused for shading
    if backend == "embree":
        pix_to_face, depth, bary = _raycast_embree(vertices, faces, cameras, directions)
    else:
        pix_to_face, depth, bary = _rasterize_pytorch3d(vertices, faces, cameras)
    image = shade_faces(pix_to_face, face_normals(vertices, faces), cameras, directions)
    return RenderOutput(image=image, pix_to_face=pix_to_face, depth=depth, bary=bary, mask=pix_to_face >= 0)


# ---------------------------------------------------------------------------------------------- Embree
def _raycast_embree(
    vertices: Tensor, faces: Tensor, cameras: Cameras, directions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One batched Embree ray cast through all pixel centres of all views.

    Embree (float32) only decides *which* face each ray hits first; the hit itself is recomputed in
    float64 with Moller-Trumbore on that face (ray parameter, hence location, and its barycentrics),
    so depth and barycentrics do not inherit Embree's float32 error. ``directions`` (V,H,W,3) have unit
    view-z, so the ray parameter of a hit is its view depth.
    """
    from embreex import rtcore_scene
    from embreex.mesh_construction import TriangleMesh

    out_device = vertices.device
    n_views, size = len(cameras), cameras.image_size
    n_rays = n_views * size * size
    verts64 = vertices.detach().cpu().to(torch.float64)
    faces_cpu = faces.cpu()

    # Robust (watertight) traversal: rays through a shared edge or vertex hit one of its faces instead of
    # leaking through as background speckles; costs ~10-30% ray-cast time.
    scene = rtcore_scene.EmbreeScene(robust=True)
    TriangleMesh(scene, verts64.numpy().astype(np.float32), faces_cpu.numpy().astype(np.int32))

    ray_dirs = directions.detach().cpu().to(torch.float32).reshape(n_rays, 3).contiguous()
    centres = cameras.centers.detach().cpu().to(torch.float64)  # (V,3)
    ray_view = torch.arange(n_views).repeat_interleave(size * size)
    origins_np = centres.to(torch.float32).numpy()[ray_view.numpy()]
    hit_face = torch.from_numpy(scene.run(origins_np, ray_dirs.numpy()).astype(np.int64))

    pix_to_face = torch.full((n_rays,), -1, dtype=torch.long)
    depth = torch.full((n_rays,), float("inf"), dtype=torch.float32)
    bary = torch.zeros(n_rays, 3, dtype=torch.float32)
    hit_rays = torch.nonzero(hit_face >= 0).squeeze(-1)
    if hit_rays.numel() > 0:
        face_ids = hit_face[hit_rays]
        t, b1, b2 = _moller_trumbore(
            centres[ray_view[hit_rays]], ray_dirs[hit_rays].to(torch.float64), verts64[faces_cpu[face_ids]]
        )
        pix_to_face[hit_rays] = face_ids
        depth[hit_rays] = t.to(torch.float32)
        bary[hit_rays] = torch.stack([1.0 - b1 - b2, b1, b2], dim=-1).to(torch.float32)
    shape = (n_views, size, size)
    return (
        pix_to_face.reshape(shape).to(out_device),
        depth.reshape(shape).to(out_device),
        bary.reshape(*shape, 3).to(out_device),
    )


def _moller_trumbore(origins: Tensor, directions: Tensor, tri: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ray/triangle intersection for rays already known to hit: returns ray parameter t and the
    barycentric weights (b1, b2) of vertices 1 and 2 (vertex 0 gets 1 - b1 - b2)."""
    edge1 = tri[:, 1] - tri[:, 0]
    edge2 = tri[:, 2] - tri[:, 0]
    p = torch.linalg.cross(directions, edge2, dim=-1)
    det = (edge1 * p).sum(-1)
    # A ray Embree reports as hitting is never exactly parallel to the face; guard degenerate faces.
    tiny = torch.finfo(det.dtype).tiny
    det = torch.where(det.abs() < tiny, torch.full_like(det, tiny), det)
    inv_det = 1.0 / det
    s = origins - tri[:, 0]
    b1 = (s * p).sum(-1) * inv_det
    q = torch.linalg.cross(s, edge1, dim=-1)
    b2 = (directions * q).sum(-1) * inv_det
    t = (edge2 * q).sum(-1) * inv_det
    return t, b1, b2


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
