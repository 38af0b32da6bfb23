"""Per-shape part-segmentation mIoU under the three conventions papers report.

The one definition of a shape's mIoU: Stage 2 validation logs its ``released`` column
(:meth:`~patchalign.training.modules.Stage2Alignment.validation_step`), and the benchmark metric
:class:`patchalign.eval.metrics.PartSegIoU` accumulates all three (the conventions are explained
there). Plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

CONVENTIONS: tuple[str, ...] = ("released", "pointbert", "find3d")


def per_shape_miou(preds: Tensor, target: Tensor, num_parts: Tensor) -> Tensor:
    """Shape mIoU of each shape under each convention, ``(B, 3)`` in :data:`CONVENTIONS` order.

    Args:
        preds: ``(B, N)`` predicted local part ids (``-1`` = no part).
        target: ``(B, N)`` ground-truth local part ids (``-1`` = unlabelled).
        num_parts: ``(B,)`` number of parts of each shape's category.

    Returns:
        float64 ``(B, 3)``; ``NaN`` where a convention skips the whole shape.
    """
    if preds.shape != target.shape or preds.dim() != 2:
        raise ValueError(
            f"preds and target must both be (B, N), got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    num_parts = torch.as_tensor(num_parts, device=preds.device).long().reshape(-1)
    if num_parts.shape[0] != preds.shape[0] or (num_parts <= 0).any():
        raise ValueError(f"num_parts must hold one positive count per shape, got {num_parts.tolist()}")
    if ((preds < -1) | (preds >= num_parts[:, None])).any():
        raise ValueError("predicted part ids must lie in [-1, num_parts) of their shape")
    if ((target < -1) | (target >= num_parts[:, None])).any():
        raise ValueError("ground-truth part ids must lie in [-1, num_parts) of their shape")
    k = int(num_parts.max())
    parts = torch.arange(k, device=preds.device)
    pred_oh = preds[..., None] == parts  # (B, N, K)
    gt_oh = target[..., None] == parts
    labelled = (target >= 0)[..., None]
    inter = (pred_oh & gt_oh).sum(1).double()  # (B, K)
    union_labelled = ((pred_oh & labelled) | gt_oh).sum(1).double()
    union_all = (pred_oh | gt_oh).sum(1).double()
    gt_count = gt_oh.sum(1)
    exists = parts[None, :] < num_parts[:, None]  # parts of the shape's category

    def mean_over(iou: Tensor, include: Tensor) -> Tensor:
        n = include.sum(1)
        total = torch.where(include, iou, torch.zeros_like(iou)).sum(1)
        return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))

    released = mean_over(inter / union_labelled.clamp_min(1), exists & (gt_count > 0))
    pointbert_iou = torch.where(
        union_labelled == 0, torch.ones_like(inter), inter / union_labelled.clamp_min(1)
    )
    pointbert = mean_over(pointbert_iou, exists)
    find3d = mean_over(inter / union_all.clamp_min(1), exists & (union_all > 0))
    return torch.stack([released, pointbert, find3d], dim=1)


def point_miou(patch_pred: Tensor, point_to_patch: Tensor, membership: Tensor, label_mask: Tensor) -> Tensor:
    """Stage 2 validation mIoU of each shape (``released`` convention), from patch predictions.

    Each point takes its nearest patch's predicted label (``point_to_patch``) and is compared with
    its first part in ``membership (B, P, L)``; points in no part are ignored, shapes without parts
    (``label_mask`` all false: validation padding) left out, as are shapes the convention skips.

    Returns:
        float32 ``(S,)``, one value per scored shape.
    """
    memb = membership > 0.5
    has = memb.any(-1)
    gt = torch.where(has, memb.float().argmax(-1), -1)
    pred = torch.where(has, torch.gather(patch_pred, 1, point_to_patch), -1)
    k = label_mask.sum(1)
    keep = k > 0
    if not keep.any():
        return patch_pred.new_zeros(0, dtype=torch.float32)
    miou = per_shape_miou(pred[keep], gt[keep], k[keep])[:, 0].float()  # column 0: released
    return miou[~miou.isnan()]
