"""Sizing PyTorch3D's coarse-to-fine rasterization bins so they can never overflow.

On CUDA, PyTorch3D first sorts faces (or points) into square screen bins of ``bin_size`` pixels, each
holding at most ``max_faces_per_bin`` entries. When a bin overflows, the CUDA kernel only ``printf``s a
warning (invisible to Python) and silently drops faces, i.e. holes in ``pix_to_face``. Its default cap,
``max(10000, F / 5)``, overflows on dense meshes; setting the cap to F is safe but allocates
``V * n_bins * F`` ints. Instead we count, per view and bin, how many screen bounding boxes overlap the
bin -- the quantity the coarse pass stores -- with a one-pixel safety dilation, and pass the maximum.

PyTorch3D's bins are laid out in its own pixel indexing, which runs from the bottom-right corner of
our image (its +x is left and +y is up), so bin ``(by, bx)`` covers our rows
``[S - (by+1) b, S - by b)`` and columns ``[S - (bx+1) b, S - bx b)``; when b does not divide S the last
bin reaches past the top/left image edge and also collects faces lying just outside it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["coarse_bin_size", "bin_counts", "max_per_bin"]

# PyTorch3D's CUDA coarse kernels allow fewer than this many bins per image side.
_MAX_BINS_PER_SIDE = 22


def coarse_bin_size(image_size: int) -> int:
    """PyTorch3D's own heuristic (``rasterize_meshes``): 8 px up to 64 px images, else S / 16 rounded up
    to a power of two (at least 16)."""
    if image_size <= 64:
        return 8
    bin_size = int(2 ** max(math.ceil(math.log2(image_size)) - 4, 4))
    assert 1 + (image_size - 1) // bin_size < _MAX_BINS_PER_SIDE
    return bin_size


def bin_counts(lo: Tensor, hi: Tensor, image_size: int, bin_size: int) -> Tensor:
    """Number of screen boxes overlapping each PyTorch3D bin, per view.

    Args:
        lo, hi: (V,E,2) box corners in our pixel coordinates (u = column, v = row; continuous), already
            dilated by the caller. Boxes entirely outside the image count nowhere; NaN boxes nowhere.
        image_size: S.
        bin_size: b.

    Returns:
        (V, n_bins, n_bins) long counts in PyTorch3D's bin order ``[by, bx]``.
    """
    size = image_size
    n_views = lo.shape[0]
    n_bins = 1 + (size - 1) // bin_size
    # PyTorch3D's continuous pixel coordinate is S - ours on both axes (our pixel p is its S-1-p), and
    # the last bin extends past the image edge to n_bins * b, so boxes just off-image still count there.
    extent = n_bins * bin_size
    int_lo, int_hi = size - hi, size - lo
    inside = (int_hi >= 0).all(-1) & (int_lo < extent).all(-1)  # False for NaN too
    bin_lo = torch.floor(int_lo.clamp(0, extent - 1)).long() // bin_size  # (V,E,2) as (x, y)
    bin_hi = torch.floor(int_hi.clamp(0, extent - 1)).long() // bin_size
    view = torch.arange(n_views, device=lo.device)[:, None].expand_as(inside)
    view, bin_lo, bin_hi = view[inside], bin_lo[inside], bin_hi[inside]
    # 2D difference array: +1 at the low corner, -1 past each high edge, +1 past both; prefix sums
    # along both axes then give every bin its overlap count without enumerating (box, bin) pairs.
    side = n_bins + 1
    diff = torch.zeros(n_views * side * side, dtype=torch.long, device=lo.device)
    x0, y0 = bin_lo[:, 0], bin_lo[:, 1]
    x1, y1 = bin_hi[:, 0] + 1, bin_hi[:, 1] + 1
    base = view * side * side
    ones = torch.ones_like(x0)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.scatter_add_(0, base + ys * side + xs, sign * ones)
    counts = diff.reshape(n_views, side, side).cumsum(1).cumsum(2)
    return counts[:, :n_bins, :n_bins]


def max_per_bin(lo: Tensor, hi: Tensor, image_size: int, bin_size: int, slack: int = 8) -> int:
    """A ``max_faces_per_bin`` / ``max_points_per_bin`` that cannot overflow for these boxes."""
    counts = bin_counts(lo, hi, image_size, bin_size)
    return int(counts.max()) + slack if counts.numel() else slack
