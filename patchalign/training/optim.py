"""Optimiser rules of both training stages: AdamW parameter groups, the learning-rate schedule and
the rule that keeps the global batch (or scales the learning rate) under DDP.

Plain torch; :class:`~patchalign.training.modules.Stage1Distillation` and
:class:`~patchalign.training.modules.Stage2Alignment` call :func:`build_optimizer` from
``configure_optimizers`` and :func:`apply_ddp_rule` when ``fit`` starts; Stage 2 chooses what trains
with :func:`set_trainable`. Defaults are the released
recipe (dickoah/PatchAlign3D ``src/training/stage1.py`` / ``stage2.py``); what our configs change
is listed in ``docs/fidelity.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from patchalign.model import PatchAlignEncoder

log = logging.getLogger(__name__)

#: parameters a ``decay_all_params: false`` run never decays (besides 1-d tensors and biases)
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "cls_token", "cls_pos")


@dataclass
class OptimizerConfig:
    """AdamW, schedule and batch/learning-rate rule shared by both stages.

    Defaults are the released recipe (``stage1.py`` / ``stage2.py``): ``AdamW(groups,
    weight_decay=0.05)`` with torch's betas and eps, the encoder at ``lr`` (``--enc_learning_rate``
    1e-4) and the head and temperature at ``head_lr`` (``--learning_rate`` 5e-4), weight decay on
    every parameter, no schedule.

    Attributes:
        lr: learning rate of the encoder.
        head_lr: learning rate of the projection head and the Stage 2 logit parameters.
        weight_decay: AdamW decoupled weight decay.
        decay_all_params: decay every parameter (released); ``False`` exempts norms, biases, the
            CLS token/position and the logit parameters (timm / Point-BERT ``add_weight_decay``).
        betas, eps: AdamW's.
        schedule: ``constant`` (released) or ``cosine`` decay to ``min_lr_ratio`` after warm-up.
        warmup_steps: linear warm-up steps (released: 0).
        min_lr_ratio: final learning rate of the cosine schedule relative to the peak.
        global_batch_size: the global batch (per-rank batch x ranks x gradient accumulation) the
            learning rates are meant for; ``None``: the data module's ``batch_size``, i.e. the
            batch as configured for one device (the released runs use one GPU).
        ddp_rule: what happens when ranks x accumulation x per-rank batch differs from it:
            ``keep_global_batch`` (default) sets the per-rank batch to ``global_batch_size /
            (ranks x accumulation)``: the released batch 32 on any number of GPUs, at the same lr
            and the same number of steps (an error if it does not divide); ``scale_lr`` keeps the
            per-rank batch and multiplies both learning rates by ``actual / global_batch_size``
            (linear scaling rule, Goyal et al., arXiv 1706.02677); ``none`` changes nothing
            (the global batch grows with the GPU count at the same lr; printed as a warning).
        The rule and the resulting global batch and learning rates are printed when ``fit`` starts.
    """

    lr: float = 1e-4
    head_lr: float = 5e-4
    weight_decay: float = 0.05
    decay_all_params: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    global_batch_size: int | None = None
    ddp_rule: Literal["keep_global_batch", "scale_lr", "none"] = "keep_global_batch"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.head_lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"optimizer: lr/head_lr must be > 0, weight_decay/warmup_steps >= 0: {self}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.ddp_rule not in ("keep_global_batch", "scale_lr", "none"):
            raise ValueError(
                f"optimizer.ddp_rule must be keep_global_batch, scale_lr or none, got {self.ddp_rule!r}"
            )
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError("optimizer.global_batch_size must be positive")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


def as_optimizer_config(optim: OptimizerConfig | dict | None) -> OptimizerConfig:
    if optim is None:
        return OptimizerConfig()
    if isinstance(optim, OptimizerConfig):
        return optim
    return OptimizerConfig(**dict(optim))


def param_groups(
    named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, decay_all: bool
) -> list[dict]:
    """Split parameters into decayed and non-decayed groups (no decay on norms, biases, t, b)."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)
        (no_decay if (skip and not decay_all) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def build_optimizer(
    body: list[tuple[str, nn.Parameter]],
    head: list[tuple[str, nn.Parameter]],
    cfg: OptimizerConfig,
    total_steps: int,
    lr_factor: float = 1.0,
) -> dict[str, Any]:
    """AdamW over the trainable ``body`` (encoder) and ``head`` parameters plus a per-step schedule."""
    groups = param_groups(body, cfg.lr * lr_factor, cfg.weight_decay, cfg.decay_all_params)
    groups += param_groups(head, cfg.head_lr * lr_factor, cfg.weight_decay, cfg.decay_all_params)
    opt = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    total = max(1, int(total_steps))
    warmup = min(cfg.warmup_steps, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def apply_ddp_rule(trainer: Any, cfg: OptimizerConfig) -> float:
    """Apply ``cfg.ddp_rule`` to the data module's batch; return the learning-rate factor.

    Prints the global batch and the learning rates on rank zero (a warning when ``ddp_rule: none``
    leaves the global batch off the reference). ``keep_global_batch`` changes
    ``trainer.datamodule.batch_size`` in place.
    """
    dm = getattr(trainer, "datamodule", None)
    per_rank = getattr(dm, "batch_size", None)
    if per_rank is None:
        return 1.0
    ranks = int(trainer.world_size)
    accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    target = int(cfg.global_batch_size or per_rank)
    actual = int(per_rank) * ranks * accum
    factor = 1.0
    if actual != target and cfg.ddp_rule == "keep_global_batch":
        if target % (ranks * accum):
            raise ValueError(
                f"global batch {target} is not divisible by {ranks} ranks x {accum} accumulation "
                "steps: change the allocation or the batch, or set optim.ddp_rule: scale_lr"
            )
        dm.batch_size = target // (ranks * accum)
        actual = target
    elif actual != target and cfg.ddp_rule == "scale_lr":
        factor = actual / target
    msg = (
        f"global batch {actual} = {dm.batch_size} per rank x {ranks} ranks x {accum} accumulation "
        f"(optim.ddp_rule={cfg.ddp_rule}, reference {target}); lr {cfg.lr * factor:g} encoder, "
        f"{cfg.head_lr * factor:g} head"
    )
    if actual != target and cfg.ddp_rule == "none":
        msg += f" -- WARNING: not the reference batch {target}, learning rates unchanged"
        log.warning(msg)
    if trainer.is_global_zero:
        print(msg)
    return factor


Trainable = Literal["released", "blocks", "all"]

#: the released ``freeze_encoder_except_last_block``: besides the trained blocks, these stay trainable
RELEASED_EXTRA_TRAINABLE = ("norm.", "reduce_dim.", "cls_token", "cls_pos")


def set_trainable(
    encoder: PatchAlignEncoder, trainable: Trainable | list[str], freeze_blocks: int
) -> list[str]:
    """Set ``requires_grad`` on the encoder's parameters per ``trainable``; return the trainable names.

    ``released``: the blocks from ``freeze_blocks`` on plus :data:`RELEASED_EXTRA_TRAINABLE`;
    ``blocks``: those blocks and the final norm; ``all``; or a list of parameter-name prefixes (each
    must name a parameter). The head (``head.*``) always trains.
    """
    blocks = tuple(f"blocks.{i}." for i in range(freeze_blocks, encoder.config.depth))
    if trainable == "all":
        prefixes: tuple[str, ...] = ("",)
    elif trainable == "released":
        prefixes = blocks + RELEASED_EXTRA_TRAINABLE
    elif trainable == "blocks":
        prefixes = blocks + ("norm.",)
    elif isinstance(trainable, list | tuple):
        prefixes = tuple(trainable)
        names = [n for n, _ in encoder.named_parameters()]
        unused = [t for t in prefixes if not any(n.startswith(t) for n in names)]
        if unused:
            raise ValueError(f"trainable prefixes {unused} name no encoder parameter")
    else:
        raise ValueError(f"trainable must be released, blocks, all or a list of prefixes, got {trainable!r}")
    out = []
    for name, p in encoder.named_parameters():
        train = name.startswith("head.") or any(name.startswith(t) for t in prefixes)
        p.requires_grad_(train)
        if train:
            out.append(name)
    return out
