"""Shape geometry shared by every layer: unit-sphere normalisation and area-weighted surface sampling.

**Normalisation**, one implementation per convention, named by the centre it uses.

Two conventions are in use and they are **not** interchangeable (the centre moves the shape, so
evaluating with the other one can shift mIoU silently):

* :func:`normalize_unit_sphere_centroid`: subtract the point **mean**, divide by the farthest
  point's distance. Point-BERT's ``pc_normalize`` (Yu et al., arXiv 2111.14819) and the released
  PatchAlign3D segmenter's ``_normalize_points`` (dickoah/PatchAlign3D@b269f6d
  ``src/tools/patch_align_segmenter.py``). The model's input convention: the evaluation protocol
  and :meth:`patchalign.pretrained.PretrainedPatchAlign.encode`.
* :func:`unit_sphere_bbox` / :func:`normalize_unit_sphere_bbox`: subtract the **bounding-box
  centre** of the vertices the faces use, divide by the farthest such vertex's distance. For
  meshes, where vertex density is arbitrary (a detailed handle would drag a mean); the renderer,
  data engine and ZeroKey use it, and record the transform so results map back to the file's frame.

**Surface sampling** (:func:`sample_surface`): area-uniform points on a triangle mesh that remember
which face each came from. The face id is what ties a 3D point to the rendered pixels
(``pix_to_face``) during back-projection and to per-face part labels, as Find3D's customised
``sample_points_from_meshes`` does; the data engine, mesh segmentation and ZeroKey use it.

Plain torch (and numpy for the centroid form, which evaluation readers hand over as arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DegenerateShapeError",
    "SurfaceSample",
    "UnitSphereTransform",
    "face_areas_normals",
    "normalize_unit_sphere_bbox",
    "normalize_unit_sphere_centroid",
    "sample_surface",
    "unit_sphere_bbox",
]

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


class DegenerateShapeError(ValueError):
    """Every point (or used vertex) of a shape is at one location: there is no scale to divide by."""


class UnitSphereTransform(NamedTuple):
    """The similarity a normalisation applied: ``original = normalised * scale + centre``.

    A tuple, so it unpacks as ``centre, scale``; ``centre`` is (3,) float64 (the precision of the
    computation, so a record does not lose digits to float32), ``scale`` a Python float > 0.
    """

    centre: Tensor
    scale: float

    def to_original(self, points: Tensor) -> Tensor:
        """Map (..., 3) points from the normalised frame back to the original frame."""
        return points * self.scale + self.centre.to(points)

    def to_normalized(self, points: Tensor) -> Tensor:
        """Map (..., 3) points from the original frame into the normalised (unit-sphere) frame."""
        return (points - self.centre.to(points)) / self.scale


def unit_sphere_bbox(points: Tensor, faces: Tensor | None = None) -> UnitSphereTransform:
    """Bounding-box centre and farthest-point radius (in float64) of ``points`` (N, 3).

    With ``faces`` only the vertices a face references count, so stray unreferenced vertices in a
    mesh file cannot shrink the shape.

    Raises:
        DegenerateShapeError: zero extent.
    """
    used = (points if faces is None else points[torch.unique(faces)]).to(torch.float64)
    centre = (used.min(dim=0).values + used.max(dim=0).values) / 2
    scale = float((used - centre).norm(dim=-1).max())
    if not scale > 0:
        raise DegenerateShapeError("shape has zero extent (all its points at one location)")
    return UnitSphereTransform(centre=centre, scale=scale)


def normalize_unit_sphere_bbox(
    points: Tensor, faces: Tensor | None = None
) -> tuple[Tensor, UnitSphereTransform]:
    """``points`` moved to the unit sphere about the bounding-box centre (input dtype) and the transform.

    See :func:`unit_sphere_bbox`; ``normalised = (points - centre) / scale``.
    """
    transform = unit_sphere_bbox(points, faces)
    return transform.to_normalized(points), transform


def normalize_unit_sphere_centroid(points: ArrayT, allow_degenerate: bool = False) -> ArrayT:
    """Centre on the centroid and scale the farthest point to radius 1 (Point-BERT's ``pc_normalize``).

    ``points`` is (N, 3) or batched (..., N, 3), a numpy array or a tensor; the result has the same
    type and dtype (numpy results are float32, as the evaluation protocol has always returned).
    The arithmetic runs in the input's own library and precision, so numbers are what each caller
    computed before this function existed.

    Args:
        allow_degenerate: a shape with all points at one location comes back centred (all zero)
            instead of raising (the evaluation protocol's behaviour; the inference API raises).

    Raises:
        DegenerateShapeError: a shape has zero extent and ``allow_degenerate`` is false.
    """
    if isinstance(points, np.ndarray):
        centred = points - points.mean(axis=-2, keepdims=True)
        radius = np.sqrt((centred**2).sum(axis=-1)).max(axis=-1)[..., None, None]
        degenerate = radius == 0
        if degenerate.any() and not allow_degenerate:
            raise DegenerateShapeError("a shape has all its points at one location; it cannot be normalised")
        return np.where(degenerate, centred, centred / np.where(degenerate, 1.0, radius)).astype(np.float32)
    centred = points - points.mean(-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(-1)[..., None, None]
    degenerate = radius == 0
    if bool(degenerate.any()) and not allow_degenerate:
        raise DegenerateShapeError("a shape has all its points at one location; it cannot be normalised")
    return torch.where(degenerate, centred, centred / torch.where(degenerate, 1.0, radius))


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
