"""Lift 2D keypoint detections to weighted 3D surface candidates (ZeroKey's Gaussian soft voting,
arXiv:2412.06292).

Around each detected pixel we take an ``h x h`` patch with Gaussian weights (sigma = h/3, centred on
the detection) and cast every foreground pixel of it to the surface: through the renderer's
``pix_to_face`` + barycentrics for meshes (exact surface points), through ``pix_to_point`` for point
clouds, or generically by unprojecting the depth buffer. A detection is a few pixels wide in the
model's eyes; the patch turns it into a small, weighted 3D blob, and blobs from many views agree where
the keypoint really is -- which the clustering step then finds.

All detections of a shape are lifted at once: (P detections) x (h*h offsets) index tensors, no Python
loop over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from zerokey.original import lift_disc_maps
from zerokey.views import RenderedViews

__all__ = ["Candidates3D", "patch_offsets", "lift_points", "lift_discs"]


@dataclass
class Candidates3D:
    """Weighted 3D candidates; row ``i`` came from detection ``source[i]`` in view ``view[i]``."""

    xyz: Tensor  # (C,3) normalised shape coordinates
    weight: Tensor  # (C,)
    name_index: Tensor  # (C,) long
    view: Tensor  # (C,) long
    source: Tensor  # (C,) long index of the 2D detection
    #: disc lifting (``voting="disc"``) only: per candidate, the mean weight over every disc pixel of its
    #: name, background included -- the original's HDBSCAN sample weights are ``weight / mean_weight``.
    mean_weight: Tensor | None = None

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def select(self, mask: Tensor) -> Candidates3D:
        return Candidates3D(
            self.xyz[mask],
            self.weight[mask],
            self.name_index[mask],
            self.view[mask],
            self.source[mask],
            None if self.mean_weight is None else self.mean_weight[mask],
        )


def patch_offsets(patch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(h*h, 2) integer (col, row) offsets of an h x h patch, relative to its first pixel."""
    steps = torch.arange(patch_size, device=device)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1)


def lift_points(
    uv: Tensor,
    view: Tensor,
    name_index: Tensor,
    views: RenderedViews,
    surface: Tensor,
    faces: Tensor | None = None,
    patch_size: int = 5,
    method: Literal["auto", "barycentric", "points", "depth"] = "auto",
    voting: Literal["gaussian", "binary"] = "gaussian",
) -> Candidates3D:
    """Cast an h x h Gaussian patch around every 2D detection to the surface.

    Args:
        uv: (P,2) pixel coordinates (column, row; pixel centres at +0.5).
        view: (P,) view of each detection; name_index: (P,) its name.
        views: the renders (depth / correspondences).
        surface: mesh vertices (N,3), or the point cloud for point renders.
        faces: mesh faces (F,3) (barycentric method).
        patch_size: h. The patch is the h x h block of pixels whose centres are nearest ``uv``
            (``first = round(uv - h/2)``), so for odd h it is centred on the pixel containing ``uv``.
        method: "barycentric" (mesh: sum of bary x face vertices), "points" (point cloud: the hit
            point), "depth" (``Cameras.unproject`` of the depth buffer at the pixel centre; works for
            both), or "auto" (barycentric for meshes, depth for clouds: every pixel then gives its own
            surface point, as the paper's ray-surface intersection does; "points" makes the pixels of
            one patch coincide on a few cloud points, see :mod:`zerokey.cluster`).
        voting: "gaussian" (paper's soft voting) or "binary" (the paper's ablation: every patch pixel
            weighs 1).

    Returns:
        :class:`Candidates3D`; weights are ``exp(-d^2 / (2 sigma^2))`` with ``d`` the distance from the
        pixel centre to ``uv`` and ``sigma = h/3``. Pixels outside the image or on the background are
        dropped (a detection half off the silhouette keeps its on-surface half, with its weights).
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    device = views.depth.device
    if method == "auto":
        method = "barycentric" if views.pix_to_face is not None else "depth"
    if method == "barycentric" and (views.pix_to_face is None or views.bary is None or faces is None):
        raise ValueError("barycentric lifting needs a mesh render (pix_to_face, bary) and faces")
    if method == "points" and views.pix_to_point is None:
        raise ValueError("points lifting needs a point-cloud render (pix_to_point)")
    if method not in ("barycentric", "points", "depth"):
        raise ValueError(f"unknown lifting method {method!r}")

    size = views.image_size
    uv = uv.to(device=device, dtype=torch.float32)
    view = view.to(device)
    name_index = name_index.to(device)
    first = torch.floor(uv - patch_size / 2.0 + 0.5).long()  # (P,2)
    pix = first[:, None, :] + patch_offsets(patch_size, device)[None]  # (P,h*h,2)
    sigma = patch_size / 3.0
    d2 = ((pix.float() + 0.5 - uv[:, None, :]) ** 2).sum(-1)
    weight = torch.exp(-d2 / (2.0 * sigma**2))  # (P,h*h)
    if voting == "binary":
        weight = torch.ones_like(weight)
    elif voting != "gaussian":
        raise ValueError(f"voting must be 'gaussian' or 'binary', got {voting!r}")

    det = torch.arange(uv.shape[0], device=device)[:, None].expand_as(weight)
    det_view = view[:, None].expand_as(weight)
    in_image = (pix >= 0).all(-1) & (pix < size).all(-1)
    col, row = pix[..., 0].clamp(0, size - 1), pix[..., 1].clamp(0, size - 1)
    valid = in_image & views.mask[det_view, row, col]
    col, row, det, det_view, weight = col[valid], row[valid], det[valid], det_view[valid], weight[valid]

    if method == "barycentric":
        face = views.pix_to_face[det_view, row, col]
        bary = views.bary[det_view, row, col]  # (C,3)
        corners = surface.to(device)[faces.to(device)[face]]  # (C,3,3)
        xyz = (bary[..., None] * corners).sum(1)
    elif method == "points":
        xyz = surface.to(device)[views.pix_to_point[det_view, row, col]]
    else:
        depth = views.depth[det_view, row, col]
        centres = torch.stack([col, row], dim=-1).float() + 0.5
        # One camera per candidate (Cameras indexed by a tensor), so a single unproject call covers all.
        xyz = views.cameras[det_view].unproject(centres[:, None, :], depth[:, None])[:, 0]
    return Candidates3D(xyz.float(), weight.float(), name_index[det], det_view, det)


def lift_discs(
    uv: Tensor, view: Tensor, name_index: Tensor, views: RenderedViews, radius: float = 15.0
) -> Candidates3D:
    """The original code's soft voting (``voting="disc"``, :func:`zerokey.original.lift_disc_maps`):
    per (view, name) the detections' Gaussian discs of ``radius`` pixels are summed and quantised to
    uint8, and every disc pixel on the surface becomes a candidate (depth unprojection at the pixel
    centre) with that weight; pixels on the background only count in ``mean_weight``.

    ``uv`` must follow the original's centring (Molmo percent x image size, compared with integer
    pixel indices); our pointers' pixel-centre convention puts a point half a pixel further, which at
    1024 px is below the disc's resolution.
    """
    device = views.depth.device
    v, k, col, row, weight, det = lift_disc_maps(
        uv.to(device=device, dtype=torch.float32),
        view.to(device),
        name_index.to(device),
        views.image_size,
        radius,
    )
    n_names = int(k.max()) + 1 if k.numel() else 0
    total = torch.zeros(n_names, device=device).index_add_(0, k, weight)
    count = torch.zeros(n_names, device=device).index_add_(0, k, torch.ones_like(weight))
    mean = total / count.clamp_min(1.0)
    on_surface = views.mask[v, row, col]
    v, k, col, row, weight, det = (
        v[on_surface],
        k[on_surface],
        col[on_surface],
        row[on_surface],
        weight[on_surface],
        det[on_surface],
    )
    depth = views.depth[v, row, col]
    centres = torch.stack([col, row], dim=-1).float() + 0.5
    xyz = (
        views.cameras[v].unproject(centres[:, None, :], depth[:, None])[:, 0]
        if len(v)
        else torch.zeros(0, 3, device=device)
    )
    return Candidates3D(xyz.float(), weight, k, v, det, mean[k])
