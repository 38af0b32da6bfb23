"""Training losses for both stages: plain functions and small parameter holders, torch only.

* Stage 1 (distillation): :func:`cosine_distillation_loss` (released ``stage1.py``: ``1 - cos``).
* Joint training (the paper's ablation): :func:`joint_loss`, the two losses summed.
* Stage 2 (text alignment), two variants selectable by config so they can be compared:
  - :func:`sigmoid_patch_text_loss` + :class:`SigmoidLogitParams`: the talk's SigLIP loss (Zhai et
    al., arXiv 2303.15343) over all patch–text pairs in the batch, fractional targets, learnable
    temperature and bias.
  - :func:`per_shape_bce_loss` + :class:`ScaleLogitParams`: the released code's per-shape BCE over
    the shape's own labels with ``pos_weight = max(1, K-1)`` and its ``LearnableTemp``
    (dickoah/PatchAlign3D ``src/training/stage2.py``, arXiv 2601.02457): a learnable **log** scale
    initialised to ``log(1/0.07)``, multiplier ``min(exp(s), 100)``.

Every patch–text logit in the project (training, export, inference) is computed by
:func:`patch_text_logits` / :func:`logit_multiplier`, so the forms cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LogitForm = Literal["sigmoid", "scale", "log_scale", "none"]
"""``sigmoid``: ``exp(t) cos + b`` (SigLIP); ``log_scale``: ``min(exp(s), max) cos`` (released);
``scale``: ``min(s, max) cos`` (the released ``LearnableTemp(mode="linear")``); ``none``: no trained
parameters (``cos / 0.07``, the released ``--clip_tau`` default)."""

DEFAULT_TAU = 0.07
#: ``1 / DEFAULT_TAU``: the cosine multiplier wherever no trained one is known (the released
#: ``LearnableTemp`` initial value and ``--clip_tau``); the one place the project writes ``1/0.07``.
DEFAULT_LOGIT_SCALE = 1.0 / DEFAULT_TAU


def logit_multiplier(form: LogitForm, scale: Tensor | float | None, max_scale: float = 100.0) -> Tensor:
    """The factor that multiplies cosine similarities for a logit ``form`` (see :data:`LogitForm`)."""
    if form == "none" or scale is None:
        return torch.tensor(DEFAULT_LOGIT_SCALE)
    s = torch.as_tensor(scale, dtype=torch.float32) if not isinstance(scale, Tensor) else scale
    if form == "sigmoid":
        return s.exp()
    if form == "log_scale":
        return s.exp().clamp(max=max_scale)
    if form == "scale":
        return s.clamp(max=max_scale)
    raise ValueError(f"unknown logit form {form!r}; use sigmoid, log_scale, scale or none")


def patch_text_logits(
    cosine: Tensor,
    form: LogitForm,
    scale: Tensor | float | None,
    bias: Tensor | float | None = None,
    max_scale: float = 100.0,
) -> Tensor:
    """``multiplier * cosine (+ bias for the sigmoid form)``: the one definition of a patch–text logit."""
    out = logit_multiplier(form, scale, max_scale).to(cosine) * cosine
    if form == "sigmoid" and bias is not None:
        out = out + torch.as_tensor(bias).to(cosine)
    return out


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

    form: LogitForm = "sigmoid"
    max_scale = float("inf")

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def multiplier(self) -> Tensor:
        return logit_multiplier(self.form, self.logit_scale)

    def forward(self, similarity: Tensor) -> Tensor:
        return patch_text_logits(similarity, self.form, self.logit_scale, self.logit_bias)


class ScaleLogitParams(nn.Module):
    """The released ``LearnableTemp``: no bias, multiplier clamped at ``max_scale``.

    Args:
        init_scale: initial multiplier ``1 / tau`` (released ``1 / 0.07``).
        max_scale: clamp of the multiplier (released 100).
        log_param: ``True`` (released ``mode="exp"``): the parameter is ``s = log(multiplier)``, so
            AdamW's steps and weight decay act on the log; ``False``: the parameter is the multiplier.
    """

    def __init__(
        self, init_scale: float = DEFAULT_LOGIT_SCALE, max_scale: float = 100.0, log_param: bool = True
    ) -> None:
        super().__init__()
        self.form: LogitForm = "log_scale" if log_param else "scale"
        init = math.log(init_scale) if log_param else init_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
        self.max_scale = max_scale

    def multiplier(self) -> Tensor:
        return logit_multiplier(self.form, self.logit_scale, self.max_scale)

    def forward(self, similarity: Tensor) -> Tensor:
        return patch_text_logits(similarity, self.form, self.logit_scale, None, self.max_scale)


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
    logits = patch_text_logits(patch_features @ text_features.T, "sigmoid", logit_scale, logit_bias)
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
    form: LogitForm = "scale",
) -> Tensor:
    """The released code's Stage 2 loss: per-shape BCE over that shape's own ``K`` labels only.

    Each shape is scored against its own part names (padded to ``L``), with
    ``pos_weight = max(1, K - 1)`` to balance one positive against ``K - 1`` negatives, and logits
    ``multiplier * cos`` without a bias (``form``: ``log_scale`` = released ``min(exp(s), 100)``,
    ``scale`` = ``min(s, 100)``). The loss is averaged per shape over its valid (patch, label)
    pairs, then over shapes (the released ``F.binary_cross_entropy_with_logits`` mean, then the
    batch mean over shapes with labels).

    Args:
        patch_features: ``(B, G, C)`` L2-normalised.
        text_features: ``(B, L, C)`` L2-normalised text features of each shape's labels (padded).
        targets: ``(B, G, L)`` soft labels in ``[0, 1]``.
        label_mask: ``(B, L)`` bool, ``True`` for a shape's real labels.
        logit_scale: scalar learnable parameter of ``form`` (the multiplier is clamped at ``max_scale``).
    """
    cos = torch.einsum("bgc,blc->bgl", patch_features, text_features)
    logits = patch_text_logits(cos, form, logit_scale, None, max_scale)
    k = label_mask.sum(dim=1).to(logits.dtype)  # (B,)
    pos_weight = (k - 1).clamp_min(1.0)[:, None, None]
    y = targets.to(logits.dtype)
    # BCE with pos_weight: -[w*y*log σ(l) + (1-y)*log σ(-l)]
    loss = -(pos_weight * y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits))
    valid = label_mask[:, None, :].to(loss.dtype).expand_as(loss)
    per_shape = (loss * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1.0)
    has_labels = (k > 0).to(loss.dtype)
    return (per_shape * has_labels).sum() / has_labels.sum().clamp_min(1.0)


def joint_loss(distillation: Tensor, alignment: Tensor, weight: float = 1.0) -> Tensor:
    """The joint-training objective: ``alignment + weight * distillation``.

    The paper's joint variant "jointly optimizes both losses using each stage's respective projection
    head" and gives no weighting (arXiv 2601.02457, Table ``tab:ablation_stage``); ``weight = 1`` is
    the unweighted sum, our reading, and ``weight`` lets a run trade the two signals off. A negative
    weight would *reward* moving away from the teacher, so it is refused.

    Args:
        distillation: scalar Stage 1 loss (:func:`cosine_distillation_loss`).
        alignment: scalar Stage 2 loss (:func:`sigmoid_patch_text_loss` or :func:`per_shape_bce_loss`).
        weight: factor of the distillation term (``>= 0``).
    """
    if weight < 0:
        raise ValueError(f"joint weight must be >= 0, got {weight}")
    return alignment + weight * distillation
