"""Area-weighted surface sampling that remembers which face every point came from.

The face id is what ties a 3D point to the rendered pixels (``pix_to_face``) during back-projection
and to per-face part labels, exactly as Find3D's customised ``sample_points_from_meshes`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SurfaceSample", "face_areas_normals", "sample_surface"]


@dataclass
class SurfaceSample:
    """``points (N,3)`` float32, ``face_ids (N,)`` long, ``normals (N,3)`` float32 (unit face normals)."""

    points: Tensor
    face_ids: Tensor
    normals: Tensor


def face_areas_normals(vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Per-face areas ``(F,)`` and unit normals ``(F,3)`` (zero for degenerate faces), in float64.

    float64 because Objaverse meshes mix millimetre-sized and metre-sized triangles: in float32 the
    cumulative area used for sampling loses the small ones entirely.
    """
    tri = vertices.to(torch.float64)[faces]
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    norm = cross.norm(dim=-1)
    normals = cross / norm.clamp_min(1e-300)[:, None]
    return 0.5 * norm, normals


def sample_surface(vertices: Tensor, faces: Tensor, n_points: int, seed: int) -> SurfaceSample:
    """Sample ``n_points`` points uniformly by area on a triangle mesh, with their face ids.

    Faces are drawn by inverse-CDF lookup (``searchsorted`` on the cumulative area), which has no
    category limit (``torch.multinomial`` caps at 2^24 faces) and never picks a zero-area face;
    barycentric coordinates use the square-root trick (uniform inside each triangle). Everything is
    one vectorised pass on the mesh's device, seeded by ``seed`` for reproducibility.

    Raises:
        ValueError: no faces, or a total surface area of zero.
    """
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"cannot sample an empty mesh (faces {tuple(faces.shape)})")
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    device = vertices.device
    faces = faces.to(device=device, dtype=torch.long)
    areas, normals = face_areas_normals(vertices, faces)
    cum = areas.cumsum(0)
    total = cum[-1]
    if not bool(torch.isfinite(total)) or not bool(total > 0):
        raise ValueError(f"mesh has zero (or non-finite) surface area: {float(total)}")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    u = torch.rand(n_points, generator=gen, device=device, dtype=torch.float64) * total
    face_ids = torch.searchsorted(cum, u, right=True).clamp_max(faces.shape[0] - 1)
    r = torch.rand(n_points, 2, generator=gen, device=device, dtype=torch.float64)
    s = r[:, 0].sqrt()
    w = torch.stack([1.0 - s, s * (1.0 - r[:, 1]), s * r[:, 1]], dim=-1)  # (N, 3)
    tri = vertices.to(torch.float64)[faces[face_ids]]  # (N, 3, 3)
    points = (w[:, :, None] * tri).sum(1)
    return SurfaceSample(
        points=points.to(torch.float32), face_ids=face_ids, normals=normals[face_ids].to(torch.float32)
    )
