"""Training losses for both stages: plain functions and small parameter holders, torch only.

* Stage 1 (distillation): :func:`cosine_distillation_loss`.
* Stage 2 (text alignment), two variants selectable by config so they can be compared:
  - :func:`sigmoid_patch_text_loss` + :class:`SigmoidLogitParams`: the talk's SigLIP loss over all
    patch–text pairs in the batch, fractional targets, learnable temperature and bias.
  - :func:`per_shape_bce_loss` + :class:`ScaleLogitParams`: the released code's per-shape BCE over
    the shape's own labels with ``pos_weight = max(1, K-1)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Stage2Loss = Literal["siglip", "bce"]


def cosine_distillation_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``1 - cos(pred, target)`` over the patches that have a target.

    Args:
        pred: ``(..., C)`` predicted patch features (need not be normalised).
        target: ``(..., C)`` teacher features for the same patches.
        mask: ``(...)`` bool, ``True`` where a patch has a target. Patches without one (no teacher
            feature reached them) contribute nothing, rather than pulling towards zero.

    Returns:
        Scalar loss; ``0`` (still differentiable) when the mask selects nothing.
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
    dist = 1.0 - cos
    if mask is None:
        return dist.mean()
    mask = mask.to(dist.dtype)
    return (dist * mask).sum() / mask.sum().clamp_min(1.0)


class SigmoidLogitParams(nn.Module):
    """Learnable ``logit = exp(t) * cos + b`` with SigLIP's initialisation ``t = log 10, b = -10``."""

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(self, similarity: Tensor) -> Tensor:
        return self.logit_scale.exp() * similarity + self.logit_bias


class ScaleLogitParams(nn.Module):
    """Released code's ``logit = min(s, max_scale) * cos``, ``s`` initialised to ``1 / 0.07``, no bias."""

    def __init__(self, init_scale: float = 1.0 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.max_scale = max_scale

    def forward(self, similarity: Tensor) -> Tensor:
        return self.logit_scale.clamp(max=self.max_scale) * similarity


def sigmoid_patch_text_loss(
    patch_features: Tensor,
    text_features: Tensor,
    targets: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    patch_mask: Tensor | None = None,
) -> Tensor:
    """SigLIP loss between every patch and every text in the batch, with fractional targets.

    ``logits[p, t] = exp(logit_scale) * <z_p, e_t> + logit_bias`` and the loss is
    ``-sum_{p,t} [y log σ(l) + (1 - y) log σ(-l)] / P``, i.e. binary cross-entropy with soft labels
    ``y ∈ [0, 1]`` summed over texts and averaged over patches, as SigLIP averages over images. The
    texts are the union of every shape's part names, so the other shapes' parts act as negatives
    (their ``y`` is 0). With ``y`` the identity this equals ``open_clip.loss.SigLipLoss``.

    Args:
        patch_features: ``(P, C)`` L2-normalised patch (or image) features, all shapes flattened.
        text_features: ``(T, C)`` L2-normalised text features.
        targets: ``(P, T)`` soft labels in ``[0, 1]``.
        logit_scale: scalar ``t`` (the log of the temperature's inverse).
        logit_bias: scalar ``b``.
        patch_mask: optional ``(P,)`` bool: rows to include (e.g. patches of padded shapes excluded).
    """
    if targets.shape != (patch_features.shape[0], text_features.shape[0]):
        raise ValueError(
            f"targets {tuple(targets.shape)} must be (patches, texts) = "
            f"({patch_features.shape[0]}, {text_features.shape[0]})"
        )
    logits = logit_scale.exp() * patch_features @ text_features.T + logit_bias
    y = targets.to(logits.dtype)
    # y*log σ(l) + (1-y)*log σ(-l) = log σ(-l) + y*l  → stable via logsigmoid
    loglik = F.logsigmoid(-logits) + y * logits
    per_patch = -loglik.sum(dim=1)
    if patch_mask is None:
        return per_patch.sum() / patch_features.shape[0]
    m = patch_mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def per_shape_bce_loss(
    patch_features: Tensor,
    text_features: Tensor,
    targets: Tensor,
    label_mask: Tensor,
    logit_scale: Tensor,
    max_scale: float = 100.0,
) -> Tensor:
    """The released code's Stage 2 loss: per-shape BCE over that shape's own ``K`` labels only.

    Each shape is scored against its own part names (padded to ``L``), with
    ``pos_weight = max(1, K - 1)`` to balance one positive against ``K - 1`` negatives, and logits
    ``min(scale, max_scale) * cos`` without a bias. The loss is averaged per shape over its valid
    (patch, label) pairs, then over shapes.

    Args:
        patch_features: ``(B, G, C)`` L2-normalised.
        text_features: ``(B, L, C)`` L2-normalised text features of each shape's labels (padded).
        targets: ``(B, G, L)`` soft labels in ``[0, 1]``.
        label_mask: ``(B, L)`` bool, ``True`` for a shape's real labels.
        logit_scale: scalar learnable scale (clamped at ``max_scale``).
    """
    logits = logit_scale.clamp(max=max_scale) * torch.einsum("bgc,blc->bgl", patch_features, text_features)
    k = label_mask.sum(dim=1).to(logits.dtype)  # (B,)
    pos_weight = (k - 1).clamp_min(1.0)[:, None, None]
    y = targets.to(logits.dtype)
    # BCE with pos_weight: -[w*y*log σ(l) + (1-y)*log σ(-l)]
    loss = -(pos_weight * y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits))
    valid = label_mask[:, None, :].to(loss.dtype).expand_as(loss)
    per_shape = (loss * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1.0)
    has_labels = (k > 0).to(loss.dtype)
    return (per_shape * has_labels).sum() / has_labels.sum().clamp_min(1.0)
