"""Unit-sphere normalisation, one implementation per convention, named by the centre it uses.

Two conventions are in use and they are **not** interchangeable (the centre moves the shape, so
evaluating with the other one can shift mIoU silently):

* :func:`normalize_unit_sphere_centroid`: subtract the point **mean**, divide by the farthest
  point's distance. Point-BERT's ``pc_normalize`` (Yu et al., arXiv 2111.14819) and the released
  PatchAlign3D segmenter's ``_normalize_points`` (dickoah/PatchAlign3D@b269f6d
  ``src/tools/patch_align_segmenter.py``). The model's input convention: the evaluation protocol
  and :meth:`patchalign.pretrained.PatchAlign3D.encode`.
* :func:`unit_sphere_bbox` / :func:`normalize_unit_sphere_bbox`: subtract the **bounding-box
  centre** of the vertices the faces use, divide by the farthest such vertex's distance. For
  meshes, where vertex density is arbitrary (a detailed handle would drag a mean); the renderer,
  data engine and ZeroKey use it, and record the transform so results map back to the file's frame.

Plain torch (and numpy for the centroid form, which evaluation readers hand over as arrays).
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DegenerateShapeError",
    "UnitSphereTransform",
    "normalize_unit_sphere_bbox",
    "normalize_unit_sphere_centroid",
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
