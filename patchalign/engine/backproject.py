"""Back-projection of 2D teacher features onto sampled surface points.

Each point takes the mean teacher feature over every pixel, in every view, that shows the face the
point was sampled from (Find3D's point <-> pixel correspondence: ``pix2face == point2face``). Points
whose face no view sees take the mean of their ``k`` nearest *seen* points. Everything is batched
tensor work on the feature's device; there is no Python loop over pixels or points.

Why per face and via a sparse matrix: the teacher outputs a coarse patch grid, and its bilinear
upsampling to the image is linear. The feature of a face is therefore
``sum_pixels sum_taps w_tap * grid[cell_tap] / n_pixels``; accumulating the (face, cell) weights
(one ``bincount``, no sort) into a sparse ``(U, V*h*w)`` matrix and multiplying it with the grid gives
the exact upsample-then-average result. Cost: ``O(pixels)`` scalar work plus ``nnz x C`` for the
product, instead of ``O(pixels x C)`` for gathering upsampled features (or ``V x C x H x W`` memory
for materialising them).

Released settings (PatchAlign3D arXiv 2601.02457, dickoah/PatchAlign3D), selectable:

* ``upsample="bicubic"``: bicubic token upsampling (exact, 4x4 taps:
  :func:`patchalign.engine.teachers.resample_taps`); default ``"bilinear"``.
* ``view_average="view"``: each face's feature is the mean over the views that see it of that view's
  mean pixel feature (every seeing view counts once, however many pixels it has); default ``"pixel"``:
  the mean over all the face's pixels of all views (a view that shows the face larger weighs more).
  In both, the face is the unit: every point sampled on a face takes that face's feature (one
  representative feature per face), and unseen points are filled from their ``k_unseen = 20``
  nearest seen points.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from patchalign.engine.teachers import UPSAMPLE_MODES, resample_taps

ViewAverage = Literal["pixel", "view"]
VIEW_AVERAGE_MODES: tuple[str, ...] = get_args(ViewAverage)

__all__ = [
    "VIEW_AVERAGE_MODES",
    "BackprojectionResult",
    "NoVisiblePointsError",
    "backproject_features",
    "face_feature_sums",
    "fill_unseen",
]


class NoVisiblePointsError(ValueError):
    """No sampled point lies on a face that any view sees (camera setup or mesh is broken)."""


@dataclass
class BackprojectionResult:
    """``features (N, C)`` float32 unit rows; ``seen (N,)`` bool: the point's face was visible somewhere."""

    features: Tensor
    seen: Tensor

    @property
    def seen_fraction(self) -> float:
        return float(self.seen.float().mean()) if self.seen.numel() else 0.0


def face_feature_sums(
    grid: Tensor,
    pix_to_face: Tensor,
    faces_of_interest: Tensor,
    view_batch: int = 16,
    upsample: str = "bilinear",
    view_average: str = "pixel",
) -> tuple[Tensor, Tensor]:
    """Sum of (upsampled) features and counts per face of interest.

    Args:
        grid: ``(V, C, h, w)`` teacher patch grid (any ``h, w``; equal to ``H, W`` means per-pixel
            features, which the bilinear sampling then reproduces exactly).
        pix_to_face: ``(V, H, W)`` long face id per pixel, ``-1`` for background.
        faces_of_interest: ``(U,)`` unique face ids to accumulate (other faces are ignored, so the
            accumulator is ``U x C`` however large the mesh).
        view_batch: views processed per step (bounds the sparse matrix's size).
        upsample: ``"bilinear"`` or ``"bicubic"`` token upsampling.
        view_average: ``"pixel"``: sums over pixels and pixel counts; ``"view"``: sums over views of
            each view's pixel mean, and counts of seeing views. ``sums / counts`` is the face's feature.

    Returns:
        ``sums (U, C)`` float32 and ``counts (U,)`` long, on ``grid``'s device.
    """
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {upsample!r}; choose from {UPSAMPLE_MODES}")
    if view_average not in VIEW_AVERAGE_MODES:
        raise ValueError(f"unknown view_average {view_average!r}; choose from {VIEW_AVERAGE_MODES}")
    if grid.ndim != 4 or pix_to_face.ndim != 3 or grid.shape[0] != pix_to_face.shape[0]:
        raise ValueError(
            f"grid (V,C,h,w) and pix_to_face (V,H,W) disagree: {tuple(grid.shape)} {tuple(pix_to_face.shape)}"
        )
    device = grid.device
    n_views, channels, h, w = grid.shape
    height, width = pix_to_face.shape[1:]
    pix_to_face = pix_to_face.to(device=device, dtype=torch.long)
    faces_of_interest = faces_of_interest.to(device=device, dtype=torch.long)
    n_slots = faces_of_interest.shape[0]
    # Face id -> accumulator slot (-1 for faces no point was sampled from).
    max_pix = int(pix_to_face.max()) if pix_to_face.numel() else -1
    max_face = int(faces_of_interest.max()) if n_slots else -1
    lut = torch.full((max(max_pix, max_face, 0) + 1,), -1, dtype=torch.long, device=device)
    lut[faces_of_interest] = torch.arange(n_slots, device=device)
    sums = torch.zeros(n_slots, channels, dtype=torch.float32, device=device)
    counts = torch.zeros(n_slots, dtype=torch.long, device=device)
    grid_flat = grid.float().permute(0, 2, 3, 1).reshape(n_views * h * w, channels)
    cells_per_view = h * w
    # Views per step: the dense (slot, cell) weight accumulator stays under ~2^25 entries.
    step = max(1, min(view_batch, (1 << 25) // max(1, n_slots * cells_per_view)))
    for start in range(0, n_views, step):
        p2f = pix_to_face[start : start + step]
        n_cells = p2f.shape[0] * cells_per_view
        view, row, col = torch.nonzero(p2f >= 0, as_tuple=True)
        slot = lut[p2f[view, row, col]]
        keep = slot >= 0
        view, row, col, slot = view[keep], row[keep], col[keep], slot[keep]
        if slot.numel() == 0:
            continue
        if view_average == "pixel":
            counts += torch.bincount(slot, minlength=n_slots)
            pixel_weight = None
        else:  # each (face, view) pixel weighs 1 / (that face's pixels in that view)
            sv = slot * p2f.shape[0] + view
            per_sv = torch.bincount(sv, minlength=n_slots * p2f.shape[0])
            counts += (per_sv.view(n_slots, p2f.shape[0]) > 0).sum(1)
            pixel_weight = 1.0 / per_sv[sv].to(torch.float64)
        rows = resample_taps(row, h, height, upsample)
        cols = resample_taps(col, w, width, upsample)
        base = slot * n_cells + view * cells_per_view
        keys = torch.cat([base + yy * w + xx for yy, _ in rows for xx, _ in cols])
        weights = torch.cat(
            [wy * wx if pixel_weight is None else wy * wx * pixel_weight for _, wy in rows for _, wx in cols]
        )
        # Accumulate the (slot, cell) weights densely (bincount: no sort), then multiply only the
        # non-zero ones with the grid through a CSR matrix.
        dense = torch.bincount(keys, weights=weights, minlength=n_slots * n_cells)
        nz = torch.nonzero(dense, as_tuple=True)[0]
        nz_rows = nz // n_cells
        crow = torch.zeros(n_slots + 1, dtype=torch.long, device=device)
        crow[1:] = torch.bincount(nz_rows, minlength=n_slots).cumsum(0)
        with warnings.catch_warnings():  # CSR @ dense works on CPU and CUDA; the "beta" notice is noise
            warnings.simplefilter("ignore", UserWarning)
            mat = torch.sparse_csr_tensor(
                crow,
                nz % n_cells,
                dense[nz].to(torch.float32),
                (n_slots, n_cells),
                device=device,
                check_invariants=False,
            )
        sums += mat @ grid_flat[start * cells_per_view : start * cells_per_view + n_cells]
    return sums, counts


def fill_unseen(points: Tensor, features: Tensor, seen: Tensor, k: int = 20, chunk: int = 2048) -> Tensor:
    """Replace the rows of unseen points by the mean of their ``k`` nearest seen points' unit features.

    Neighbours' features are L2-normalised before averaging so each neighbour votes equally (raw
    teacher feature norms vary a lot between image regions). Returns all rows L2-normalised.

    Raises:
        NoVisiblePointsError: no point is seen.
    """
    out = F.normalize(features.float(), dim=-1)
    if bool(seen.all()):
        return out
    seen_idx = torch.nonzero(seen, as_tuple=True)[0]
    if seen_idx.numel() == 0:
        raise NoVisiblePointsError(f"none of the {points.shape[0]} points lies on a face seen by any view")
    unseen_idx = torch.nonzero(~seen, as_tuple=True)[0]
    seen_pts = points[seen_idx].float()
    seen_feat = out[seen_idx]
    k = min(k, seen_idx.numel())
    for start in range(0, unseen_idx.numel(), chunk):
        q = unseen_idx[start : start + chunk]
        d = torch.cdist(points[q].float(), seen_pts)
        nn_idx = d.topk(k, dim=1, largest=False).indices  # (q, k)
        out[q] = F.normalize(seen_feat[nn_idx].mean(1), dim=-1)
    return out


def backproject_features(
    grid: Tensor,
    pix_to_face: Tensor,
    face_ids: Tensor,
    points: Tensor,
    k_unseen: int = 20,
    view_batch: int = 16,
    upsample: str = "bilinear",
    view_average: str = "pixel",
) -> BackprojectionResult:
    """Per-point features from a teacher patch grid and the renders' pixel -> face map.

    Args:
        grid: ``(V, C, h, w)`` patch features of the V views.
        pix_to_face: ``(V, H, W)`` long, ``-1`` background.
        face_ids: ``(N,)`` face each point was sampled from.
        points: ``(N, 3)`` positions (for the nearest-seen-neighbour fill).
        k_unseen: neighbours averaged for unseen points.
        view_batch: views per accumulation step.
        upsample: ``"bilinear"`` (default) or ``"bicubic"`` (released) token upsampling.
        view_average: ``"pixel"`` (default) or ``"view"`` (released); see the module docstring.

    Returns:
        :class:`BackprojectionResult` on ``grid``'s device.
    """
    device = grid.device
    face_ids = face_ids.to(device=device, dtype=torch.long)
    unique_faces, slot_of_point = torch.unique(face_ids, return_inverse=True)
    sums, counts = face_feature_sums(
        grid, pix_to_face, unique_faces, view_batch=view_batch, upsample=upsample, view_average=view_average
    )
    point_counts = counts[slot_of_point]
    seen = point_counts > 0
    means = sums[slot_of_point] / point_counts.clamp_min(1)[:, None].to(sums.dtype)
    feats = fill_unseen(points.to(device), means, seen, k=k_unseen)
    return BackprojectionResult(features=feats, seen=seen)
