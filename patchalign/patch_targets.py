"""Stage 1 targets from compact per-shape patch features, matched as the released code does.

Reproduces the target lookup of PatchAlign3D's Stage 1 (Hadgi et al., arXiv 2601.02457; released code
dickoah/PatchAlign3D, ``patchalign3d/training/stage1.py`` ``train_epoch_dino``, read from a public
copy of that file; the stored repository snapshot has no commit of it): each object carries
``G0`` stored patch centres with one DINOv2 feature each (``patch_features.pt``: ``centers_xyz (G0, 3)``,
``patch_feats (G0, 768)`` fp16); every centre the encoder predicts takes the feature of its
**nearest stored centre** (Euclidean ``argmin``), L2-normalised, as its cosine target.

Why a separate module: the released targets are ~200 KB per object instead of 7.75 MB of per-point
features, so a loader can keep a whole training set decoded in memory (issue 13). Plain torch only,
batched over shapes (the released loop runs one shape at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def match_patch_targets(
    centers: Tensor,
    stored_centers: Tensor,
    stored_features: Tensor,
) -> tuple[Tensor, Tensor]:
    """Targets for predicted patch centres: the stored feature of the nearest stored centre.

    Args:
        centers: ``(B, G, 3)`` centres the encoder formed (in the same frame as ``stored_centers``:
            the loader transforms both exactly like ``points``).
        stored_centers: ``(B, G0, 3)`` stored patch centres. Rows with a non-finite coordinate are
            padding (shapes with fewer than ``G0`` stored patches) and are never matched.
        stored_features: ``(B, G0, C)`` stored patch features, fp16 or fp32.

    Returns:
        ``targets (B, G, C)`` float32, L2-normalised, and ``mask (B, G)`` bool: ``False`` where a
        shape has no valid stored centre or the matched feature is all zero (no teacher feature
        reached that patch), so the loss skips it instead of pulling towards zero.

    Distances are computed exactly (no matmul expansion) so near-ties resolve as a plain
    ``argmin`` over true distances; ties go to the lower stored index, as ``argmin`` does.
    """
    if centers.ndim != 3 or centers.shape[-1] != 3:
        raise ValueError(f"centers must be (B, G, 3), got {tuple(centers.shape)}")
    if stored_centers.ndim != 3 or stored_centers.shape[-1] != 3:
        raise ValueError(f"stored_centers must be (B, G0, 3), got {tuple(stored_centers.shape)}")
    if stored_features.ndim != 3 or stored_features.shape[:2] != stored_centers.shape[:2]:
        raise ValueError(
            f"stored_features {tuple(stored_features.shape)} must be (B, G0, C) matching "
            f"stored_centers {tuple(stored_centers.shape)}"
        )
    if centers.shape[0] != stored_centers.shape[0]:
        raise ValueError(f"batch sizes differ: centers {centers.shape[0]}, stored {stored_centers.shape[0]}")
    valid_store = torch.isfinite(stored_centers).all(-1)  # (B, G0)
    ref = torch.where(
        valid_store[..., None], stored_centers.float(), torch.zeros_like(stored_centers.float())
    )
    dist = torch.cdist(centers.float(), ref, compute_mode="donot_use_mm_for_euclid_dist")  # (B, G, G0)
    dist = dist.masked_fill(~valid_store[:, None, :], float("inf"))
    idx = dist.argmin(-1)  # (B, G)
    c = stored_features.shape[-1]
    picked = torch.gather(stored_features, 1, idx[..., None].expand(-1, -1, c)).float()
    mask = valid_store.any(-1)[:, None] & (picked.abs().sum(-1) > 0)
    return F.normalize(picked, dim=-1), mask
