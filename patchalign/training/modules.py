"""Thin LightningModules for the two training stages and the paper's joint-training ablation.

The encoder (:class:`patchalign.model.PatchAlignEncoder`) and the losses (:mod:`patchalign.losses`)
are plain torch; these classes only wire them to batches, optimisers, logging and checkpoints.
Defaults reproduce the released training (dickoah/PatchAlign3D ``src/training/stage1.py`` and
``stage2.py``, arXiv 2601.02457); every difference our configs choose is listed in
``docs/fidelity.md``.

Batches come from :class:`patchalign.data.datamodule.ShardDataModule`::

    points (B, P, 3)  features (B, P, C)  membership (B, P, L)  label_ids (B, L)  label_mask (B, L)
    category list[str]   [patch_centers (B, G0, 3)  patch_features (B, G0, C)]  (released Stage 1 targets)
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchmetrics import MeanMetric

from patchalign.checkpoints import Checkpoint, load_checkpoint_into
from patchalign.data.schema import clean_part_name
from patchalign.grouping import gather_points, patch_membership_fraction
from patchalign.losses import (
    ScaleLogitParams,
    SigmoidLogitParams,
    cosine_distillation_loss,
    joint_loss,
    per_shape_bce_loss,
    sigmoid_patch_text_loss,
)
from patchalign.model import PatchAlignEncoder, PatchHead
from patchalign.training.metrics import point_miou
from patchalign.training.optim import (
    OptimizerConfig,
    Trainable,
    apply_ddp_rule,
    as_optimizer_config,
    build_optimizer,
    set_trainable,
)

log = logging.getLogger(__name__)


def patch_feature_targets(features: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Stage 1 targets: mean teacher feature of each patch's points, L2-normalised.

    Computed on the patches the encoder actually formed (its ``group_index``). Points with an all-zero
    feature (no teacher feature reached them) are left out of the mean; a patch with none has no
    target and is masked.

    Returns:
        targets ``(B, G, C)`` and mask ``(B, G)``.
    """
    gathered = gather_points(features.float(), group_index)  # (B, G, S, C)
    valid = (gathered.abs().sum(-1) > 0).float()  # (B, G, S)
    summed = (gathered * valid[..., None]).sum(2)
    count = valid.sum(2)
    mask = count > 0
    return F.normalize(summed, dim=-1), mask


def soft_text_targets(membership: Tensor, label_ids: Tensor, group_index: Tensor, num_text: int) -> Tensor:
    """Fractional patch targets over text-bank rows: ``y[b, g, t]`` = share of patch g in part t.

    ``membership (B, P, L)`` is scattered onto the text-bank columns named by ``label_ids (B, L)``
    (``-1`` = padding). Two labels of one shape naming the same text keep the larger share.
    """
    frac = patch_membership_fraction(group_index, membership)  # (B, G, L)
    b, g, _ = frac.shape
    ids = label_ids.clamp_min(0)[:, None, :].expand(-1, g, -1)
    frac = frac * (label_ids >= 0)[:, None, :]
    out = frac.new_zeros(b, g, num_text)
    return out.scatter_reduce(2, ids, frac, reduce="amax", include_self=True)


def drop_category_labels(batch: dict[str, Any], text_names: list[str]) -> dict[str, Tensor]:
    """``label_ids`` / ``label_mask`` / ``membership`` without labels named like the shape's category.

    The released ``--exclude_category_label``: a "chair" part of a chair says nothing about parts.
    ``text_names`` are the text bank's names (``label_ids`` index them). Returns only the changed
    entries (empty when nothing is dropped).
    """
    categories = batch.get("category")
    if categories is None:
        raise ValueError("exclude_category_label needs the batch's 'category' (ShardDataModule provides it)")
    label_ids = batch["label_ids"].clone()
    drop = torch.zeros_like(label_ids, dtype=torch.bool)
    for i, cat in enumerate(categories):
        key = clean_part_name(str(cat))
        for j, t in enumerate(label_ids[i].tolist()):
            if t >= 0 and text_names[t] == key:
                drop[i, j] = True
    if not drop.any():
        return {}
    label_ids[drop] = -1
    return {
        "label_ids": label_ids,
        "label_mask": batch["label_mask"] & ~drop,
        "membership": batch["membership"] * (~drop)[:, None, :].to(batch["membership"].dtype),
    }


def distillation_targets(
    batch: dict[str, Any], centers: Tensor, group_index: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """Stage 1 targets ``(B, G, C)`` and mask ``(B, G)`` for the patches the encoder formed.

    When the batch carries the released compact per-shape targets (``patch_centers`` ``(B, G0, 3)``
    + ``patch_features`` ``(B, G0, C)``), each predicted centre takes the feature of its nearest
    stored centre (:func:`patchalign.patch_targets.match_patch_targets`, the released
    ``train_epoch_dino``); otherwise the mean per-point teacher feature of each patch
    (:func:`patch_feature_targets`). ``width`` is the distillation head's output width: a teacher
    of another width is refused here, by name, rather than failing inside the cosine.
    """
    if batch.get("patch_centers") is not None:
        from patchalign.patch_targets import match_patch_targets

        stored = batch["patch_features"]
        if stored.shape[-1] != width:
            raise ValueError(
                f"stored patch features have width {stored.shape[-1]} but the head outputs {width}"
            )
        return match_patch_targets(centers, batch["patch_centers"], stored)
    feats = batch.get("features")
    if feats is None:
        raise ValueError(
            "the distillation loss needs per-point 'features' or 'patch_centers' in the batch "
            "(shards with teacher features, and data.init_args.load_features: true)"
        )
    if feats.shape[-1] != width:
        raise ValueError(
            f"teacher features have width {feats.shape[-1]} but the head outputs "
            f"{width}: set the encoder's head_dim to the teacher width"
        )
    return patch_feature_targets(feats, group_index)


class _StageBase(L.LightningModule):
    """Shared optimiser, schedule and encoder bookkeeping of both stages."""

    encoder: PatchAlignEncoder

    def __init__(self, optim: OptimizerConfig | dict | None = None) -> None:
        super().__init__()
        self.optim = as_optimizer_config(optim)
        self._lr_factor = 1.0

    def _record_optimizer_config(self) -> None:
        # a plain dict in the checkpoint: weights_only loading needs no allow-listed dataclass
        self.hparams["optim"] = asdict(self.optim)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self._lr_factor = apply_ddp_rule(self.trainer, self.optim)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The random state (drop-path, random FPS starts) so a requeued job continues the same run.
        # Under DDP the file holds rank 0's state; every rank restores it, which is still reproducible.
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        checkpoint["patchalign_rng_state"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("patchalign_rng_state")
        if not state:
            return
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"], self.device if self.device.type == "cuda" else None)

    def _record_encoder_config(self) -> None:
        # What export and load_pretrained need to rebuild the plain encoder without this class.
        self.hparams["encoder_config"] = self.encoder.config.to_dict()

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        head = self.head_parameters()
        head_ids = {id(p) for _, p in head}
        body = [(n, p) for n, p in self.named_parameters() if id(p) not in head_ids]
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return build_optimizer(body, head, self.optim, total, self._lr_factor)

    def _log_skips(self) -> None:
        """Log the data module's per-reason skip counts (bad samples are counted, never silent)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        metrics = getattr(dm, "skip_metrics", None)
        if callable(metrics) and self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_dict(metrics(), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=False)


class Stage1Distillation(_StageBase):
    """Stage 1: distil back-projected teacher (DINOv2) features into the patches; all layers train.

    Targets: when the batch carries the released compact per-shape targets (``patch_centers``
    ``(B, G0, 3)`` + ``patch_features`` ``(B, G0, C)``), each predicted centre takes the feature of
    its nearest stored centre (:func:`patchalign.patch_targets.match_patch_targets`, the released
    ``train_epoch_dino``); otherwise the mean per-point teacher feature of each patch
    (:func:`patch_feature_targets`).

    Args:
        encoder: the backbone with a head as wide as the teacher features (768 for DINOv2-base).
        optim: :class:`OptimizerConfig` (default: the released AdamW recipe).
        target_widths: set by the CLI from the data (``{"features": C, "text": D}``); the head is
            rebuilt to ``features`` width if it differs, so the width is never typed twice.
    """

    def __init__(
        self,
        encoder: PatchAlignEncoder,
        optim: OptimizerConfig | None = None,
        target_widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["encoder", "optim"])
        self._record_optimizer_config()
        if target_widths and target_widths.get("features") not in (None, encoder.config.head_dim):
            encoder.reset_head(target_widths["features"])
        if encoder.head is None:
            raise ValueError("Stage 1 needs an encoder with a projection head (head_dim > 0)")
        self.encoder = encoder
        self._record_encoder_config()
        self.train_cos = MeanMetric()
        self.val_cos = MeanMetric()

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"encoder.head.{n}", p) for n, p in self.encoder.head.named_parameters()]

    def targets(self, batch: dict[str, Any], out: Any) -> tuple[Tensor, Tensor]:
        """``(targets (B, G, C), mask (B, G))`` for the patches the encoder formed."""
        return distillation_targets(batch, out.centers, out.group_index, out.patch_features.shape[-1])

    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        out = self.encoder(batch["points"])
        target, mask = self.targets(batch, out)
        loss = cosine_distillation_loss(out.patch_features, target, mask)
        cos = (out.patch_features.float() * target).sum(-1)[mask]
        return loss, cos

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, cos = self._step(batch)
        self.train_cos(cos.detach())
        bs = batch["points"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/cosine", self.train_cos, on_step=True, on_epoch=True, batch_size=bs)
        self._log_skips()
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, cos = self._step(batch)
        self.val_cos(cos)
        bs = batch["points"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/cosine", self.val_cos, on_epoch=True, batch_size=bs)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``test`` on a shard set: the validation metrics (logged under ``val/``)."""
        return self.validation_step(batch, batch_idx)


class Stage2Alignment(_StageBase):
    """Stage 2: align patch features with part-name text embeddings.

    Starts from a Stage 1 checkpoint (``init_from``), freezes what ``trainable`` does not name, and
    trains the rest, a new head of the text width and the logit parameters.

    Args:
        encoder: backbone whose ``head_dim`` equals the text-bank width (linked by the CLI).
        init_from: Stage 1 Lightning checkpoint, export directory or released ``.pt`` (``None``:
            random init, tests).
        init_strict: refuse an ``init_from`` whose tensors do not match the encoder (default);
            ``False`` loads the matching ones and logs the counts.
        loss: ``"bce"`` (released: per-shape BCE over the shape's own labels) or ``"siglip"`` (the
            talk: all patch–text pairs in the batch, learnable t and b).
        temperature: parametrisation of the BCE loss's learnable scale: ``"log"`` (released
            ``LearnableTemp``: ``s = log(1/0.07)``, multiplier ``min(exp(s), 100)``, decayed like
            every parameter) or ``"linear"`` (the multiplier itself is the parameter).
        max_logit_scale: clamp of the BCE multiplier (released 100).
        trainable: which encoder parameters train: ``"released"`` (the released
            ``--train_last_block_only``: the blocks from ``freeze_blocks`` on, the final norm,
            ``reduce_dim``, ``cls_token`` and ``cls_pos``), ``"blocks"`` (the blocks from
            ``freeze_blocks`` on and the final norm), ``"all"``, or a list of encoder parameter-name
            prefixes (e.g. ``["blocks.11.", "norm."]``). The head always trains.
        freeze_blocks: number of leading transformer blocks frozen by ``released`` / ``blocks``
            (default: all but the last, i.e. 11 of 12).
        frozen_train_mode: keep frozen modules in train mode (BatchNorm statistics update, drop-path
            active), as the released ``model.train()`` does (default); ``False`` puts them in eval
            mode so frozen means frozen.
        exclude_category_label: drop a part label equal to the shape's category name (after
            :func:`clean_part_name`), as the released ``--exclude_category_label`` does.
        text_bank: path of the text bank (by default the data module's); the vectors are held in
            a non-persistent buffer, never in checkpoints.
        optim: :class:`OptimizerConfig` (default: the released AdamW recipe).
        target_widths: set by the CLI from the data; the head is rebuilt to the ``text`` width.
        init_head: also load the head (and a released temperature) from ``init_from``
            (evaluating a Stage 2 checkpoint, an export or the released file) instead of starting
            a new one (Stage 1 → Stage 2).

    ``test`` on a shard set reports the validation metrics; benchmark evaluation (zero-shot part
    segmentation on ShapeNetPart and the others) is :class:`patchalign.eval.module.ZeroShotSegmentation`.
    """

    def __init__(
        self,
        encoder: PatchAlignEncoder,
        init_from: str | None = None,
        init_strict: bool = True,
        loss: Literal["bce", "siglip"] = "bce",
        temperature: Literal["log", "linear"] = "log",
        max_logit_scale: float = 100.0,
        trainable: Trainable | list[str] = "released",
        freeze_blocks: int | None = None,
        frozen_train_mode: bool = True,
        exclude_category_label: bool = False,
        text_bank: str | None = None,
        optim: OptimizerConfig | None = None,
        target_widths: dict[str, int] | None = None,
        init_head: bool = False,
    ) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["encoder", "optim"])
        self._record_optimizer_config()
        # read from attributes, not hparams: a subclass's save_hyperparameters records its own arguments
        self.loss_kind = loss
        self.frozen_train_mode = frozen_train_mode
        self.exclude_category_label = exclude_category_label
        if loss not in ("bce", "siglip"):
            raise ValueError(f"loss must be 'bce' or 'siglip', got {loss!r}")
        if temperature not in ("log", "linear"):
            raise ValueError(f"temperature must be 'log' or 'linear', got {temperature!r}")
        if target_widths and target_widths.get("text") not in (None, encoder.config.head_dim):
            encoder.reset_head(target_widths["text"])
        if encoder.head is None:
            raise ValueError("Stage 2 needs an encoder with a projection head of the text width")
        if freeze_blocks is None:  # all but the last block, whatever the depth (11 of 12 by default)
            freeze_blocks = encoder.config.depth - 1
        if not 0 <= freeze_blocks <= encoder.config.depth:
            raise ValueError(f"freeze_blocks={freeze_blocks} outside [0, {encoder.config.depth}]")
        self.encoder = encoder
        self._record_encoder_config()
        self.logit_params: SigmoidLogitParams | ScaleLogitParams = (
            SigmoidLogitParams()
            if loss == "siglip"
            else ScaleLogitParams(max_scale=max_logit_scale, log_param=temperature == "log")
        )
        if init_from:
            ckpt, report = load_checkpoint_into(
                encoder, init_from, strict=init_strict, skip_head=not init_head
            )
            log.info(
                "init_from %s (%s): %d/%d encoder tensors",
                init_from,
                ckpt.kind,
                report.loaded,
                report.expected,
            )
            if init_head:
                self._load_logit_params(ckpt)
                if ckpt.text_encoder:  # provenance: the text encoder this head was aligned to
                    self.hparams["text_encoder"] = ckpt.text_encoder
                    self.hparams["text_templates"] = list(ckpt.templates or [])
        self.trainable_names = set_trainable(encoder, trainable, freeze_blocks)
        self.frozen_modules = [
            m
            for m in (encoder.encoder, encoder.reduce_dim, encoder.pos_embed, *encoder.blocks, encoder.norm)
            if not any(p.requires_grad for p in m.parameters())
        ]
        self.train()  # puts the frozen modules in eval mode from the start (frozen_train_mode: false)
        self.register_buffer("text_vectors", torch.empty(0), persistent=False)
        self.text_names: list[str] = []
        if text_bank:
            self.set_text_bank(text_bank)
        self.train_acc = MeanMetric()
        self.val_acc = MeanMetric()
        self.val_miou = MeanMetric()

    def _load_logit_params(self, ckpt: Checkpoint) -> None:
        """Copy a trained logit scale (and bias) when the checkpoint's form is this module's."""
        form, scale = ckpt.logit.get("form"), ckpt.logit.get("scale")
        own = getattr(self.logit_params, "form", None)
        if scale is None or form != own:
            log.info(
                "init_head: logit form %s in %s, %s here: logit parameters not loaded", form, ckpt.path, own
            )
            return
        with torch.no_grad():
            self.logit_params.logit_scale.fill_(float(scale))
            if form == "sigmoid" and ckpt.logit.get("bias") is not None:
                self.logit_params.logit_bias.fill_(float(ckpt.logit["bias"]))

    def train(self, mode: bool = True) -> Stage2Alignment:
        super().train(mode)
        if mode and not self.frozen_train_mode:
            for m in self.frozen_modules:
                m.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores per-module modes captured at construction time around validation, which
        # would put the frozen modules back in train mode; enforce eval mode before every step.
        if not self.frozen_train_mode:
            for m in self.frozen_modules:
                if m.training:
                    m.eval()

    def set_text_bank(self, path_or_bank: Any) -> None:
        """Load the text bank's vectors (L2-normalised) into the non-persistent buffer."""
        if isinstance(path_or_bank, str | Path):
            from patchalign.data.textbank import load_text_bank

            bank = load_text_bank(path_or_bank)
        else:
            bank = path_or_bank
        vectors = torch.as_tensor(bank.vectors, dtype=torch.float32)
        if vectors.shape[1] != self.encoder.config.head_dim:
            raise ValueError(
                f"text bank width {vectors.shape[1]} != encoder head_dim {self.encoder.config.head_dim}"
            )
        self.text_vectors = F.normalize(vectors, dim=-1).to(self.device)
        self.text_names = list(bank.names)
        # provenance for export / load_pretrained: which text encoder and templates the head aligns to
        if getattr(bank, "encoder_id", None):
            self.hparams["text_encoder"] = bank.encoder_id
            self.hparams["text_templates"] = list(getattr(bank, "templates", []) or [])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.text_vectors.numel() == 0:
            dm = getattr(self.trainer, "datamodule", None)
            bank = getattr(dm, "text_bank", None)
            if bank is None:
                raise RuntimeError("Stage 2 needs a text bank: set model.text_bank or use ShardDataModule")
            self.set_text_bank(bank)

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        head = [(f"encoder.head.{n}", p) for n, p in self.encoder.head.named_parameters()]
        return head + [(f"logit_params.{n}", p) for n, p in self.logit_params.named_parameters()]

    def _scores(self, batch: dict[str, Any]) -> tuple[Any, Tensor, Tensor, Tensor]:
        """Encode the batch and build soft targets over the batch's own names only.

        Returns ``(out, targets (B, G, U), local_ids (B, L), used (U,))``: ``used`` are the text-bank rows
        named anywhere in the batch (sorted), ``local_ids`` each shape's labels as columns of ``targets``.
        Restricting the columns to the batch's names keeps the tensor small whatever the bank's size.
        """
        if self.exclude_category_label:
            batch.update(drop_category_labels(batch, self.text_names))
        out = self.encoder(batch["points"])
        label_ids = batch["label_ids"]
        used = torch.unique(label_ids[label_ids >= 0])
        local = torch.where(label_ids >= 0, torch.searchsorted(used, label_ids.clamp_min(0)), -1)
        targets = soft_text_targets(batch["membership"], local, out.group_index, max(1, used.numel()))
        return out, targets[..., : used.numel()], local, used

    @staticmethod
    def _own_targets(targets: Tensor, local_ids: Tensor) -> Tensor:
        """``(B, G, L)`` soft targets of each shape's own labels (padding columns read column 0)."""
        if targets.shape[-1] == 0:
            return targets.new_zeros(*targets.shape[:2], local_ids.shape[1])
        return torch.gather(targets, 2, local_ids.clamp_min(0)[:, None, :].expand(-1, targets.shape[1], -1))

    def _loss(
        self, out: Any, targets: Tensor, local_ids: Tensor, used: Tensor, batch: dict[str, Any]
    ) -> Tensor:
        z = out.patch_features.float()
        if self.loss_kind == "siglip":  # all of the batch's names: other shapes' are negatives
            text = self.text_vectors[used]
            y = targets.reshape(-1, used.numel())
            valid = batch.get("valid")  # validation pads slots with placeholder shapes: leave them out
            patch_mask = None if valid is None else valid[:, None].expand(-1, z.shape[1]).reshape(-1)
            return sigmoid_patch_text_loss(
                z.reshape(-1, z.shape[-1]),
                text,
                y,
                self.logit_params.logit_scale,
                self.logit_params.logit_bias,
                patch_mask=patch_mask,
            )
        text = self.text_vectors[batch["label_ids"].clamp_min(0)]  # (B, L, C)
        y = self._own_targets(targets, local_ids)
        return per_shape_bce_loss(
            z,
            text,
            y,
            batch["label_mask"],
            self.logit_params.logit_scale,
            self.logit_params.max_scale,
            form=self.logit_params.form,
        )

    def shape_scores(self, patch_features: Tensor, label_ids: Tensor) -> Tensor:
        """Cosine scores of each patch against the shape's own labels: ``(B, G, L)``."""
        text = self.text_vectors[label_ids.clamp_min(0)]
        return torch.einsum("bgc,blc->bgl", patch_features.float(), text)

    def _patch_predictions(
        self, out: Any, targets: Tensor, local_ids: Tensor, batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """Per-patch argmax over the shape's own labels; patch accuracy vs each patch's majority part."""
        label_ids, label_mask = batch["label_ids"], batch["label_mask"]
        scores = self.shape_scores(out.patch_features, label_ids).masked_fill(~label_mask[:, None, :], -1e4)
        own = self._own_targets(targets, local_ids) * label_mask[:, None, :]
        labelled = own.sum(-1) > 0
        pred = scores.argmax(-1)
        return pred, (pred == own.argmax(-1))[labelled].float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out, targets, local_ids, used = self._scores(batch)
        loss = self._loss(out, targets, local_ids, used, batch)
        bs = batch["points"].shape[0]
        with torch.no_grad():
            _, acc = self._patch_predictions(out, targets, local_ids, batch)
        self.train_acc(acc)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/patch_acc", self.train_acc, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/logit_scale", self.logit_params.multiplier().detach(), batch_size=bs)
        if self.loss_kind == "siglip":
            self.log("train/logit_bias", self.logit_params.logit_bias.detach(), batch_size=bs)
        self._log_skips()
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, targets, local_ids, used = self._scores(batch)
        loss = self._loss(out, targets, local_ids, used, batch)
        patch_pred, acc = self._patch_predictions(out, targets, local_ids, batch)
        miou = point_miou(patch_pred, out.point_to_patch, batch["membership"], batch["label_mask"])
        bs = batch["points"].shape[0]
        self.val_acc(acc)
        if miou.numel():
            self.val_miou(miou)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/patch_acc", self.val_acc, on_epoch=True, batch_size=bs)
        self.log("val/miou", self.val_miou, on_epoch=True, prog_bar=True, batch_size=bs)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``test`` on a shard set: the validation metrics (logged under ``val/``)."""
        return self.validation_step(batch, batch_idx)


class JointTraining(Stage2Alignment):
    """The paper's joint-training ablation: distillation and text alignment at once, from scratch.

    PatchAlign3D (arXiv 2601.02457, Table ``tab:ablation_stage``: Stage 2 only 50.5, joint 50.2,
    two-stage 56.9 ShapeNetPart mIoU) describes it as a variant "that jointly optimizes both losses
    using each stage's respective projection head". So one encoder, two heads: the encoder's own
    ``head`` (text width, the one export / :func:`patchalign.load_pretrained` / evaluation use) and
    :attr:`distill_head` (teacher width, training only, dropped by export). The loss is
    :func:`patchalign.losses.joint_loss`: ``L_text + joint_weight * L_2D``. The paper gives no
    weighting and does not say what trains; ``joint_weight: 1.0`` (unweighted sum) and every
    encoder parameter training are our reading (``docs/fidelity.md``).

    Everything else is :class:`Stage2Alignment` (text bank, loss kinds, logit parameters, category
    label drop, validation mIoU); the distillation targets are Stage 1's
    (:func:`distillation_targets`). Batches need both teacher features (or released patch targets)
    and part labels: shards with features and a text bank, ``data.init_args.load_features: true``.

    Args:
        encoder: the backbone; its head is set to the text-bank width (linked by the CLI).
        joint_weight: factor of the distillation loss (``>= 0``; ``0`` trains the distillation
            head alone, the encoder sees only the text loss).
        distill_dim: width of the distillation head; default the shards' teacher width (linked by
            the CLI as ``target_widths["features"]``).
        init_from: ``None`` (from scratch, the paper's variant) or a file to start the encoder from.
        trainable, freeze_blocks: as :class:`Stage2Alignment`; default ``"all"`` (every block).
        Other arguments: :class:`Stage2Alignment`'s.
    """

    def __init__(
        self,
        encoder: PatchAlignEncoder,
        joint_weight: float = 1.0,
        distill_dim: int | None = None,
        init_from: str | None = None,
        init_strict: bool = True,
        loss: Literal["bce", "siglip"] = "bce",
        temperature: Literal["log", "linear"] = "log",
        max_logit_scale: float = 100.0,
        trainable: Trainable | list[str] = "all",
        freeze_blocks: int | None = None,
        frozen_train_mode: bool = True,
        exclude_category_label: bool = False,
        text_bank: str | None = None,
        optim: OptimizerConfig | None = None,
        target_widths: dict[str, int] | None = None,
    ) -> None:
        if joint_weight < 0:
            raise ValueError(f"joint_weight must be >= 0, got {joint_weight}")
        width = distill_dim or (target_widths or {}).get("features")
        if not width:
            raise ValueError(
                "joint training needs the teacher width: train on shards with teacher features (the CLI "
                "links their width) or set model.init_args.distill_dim"
            )
        super().__init__(
            encoder,
            init_from=init_from,
            init_strict=init_strict,
            loss=loss,
            temperature=temperature,
            max_logit_scale=max_logit_scale,
            trainable=trainable,
            freeze_blocks=freeze_blocks,
            frozen_train_mode=frozen_train_mode,
            exclude_category_label=exclude_category_label,
            text_bank=text_bank,
            optim=optim,
            target_widths=target_widths,
        )
        self.joint_weight = float(joint_weight)
        self.distill_head = PatchHead(encoder.config.trans_dim, int(width))
        nn.init.trunc_normal_(self.distill_head.proj.weight, std=0.02)
        nn.init.zeros_(self.distill_head.proj.bias)
        self.hparams["distill_dim"] = int(width)
        self.train_cos = MeanMetric()
        self.val_cos = MeanMetric()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "load_features", True) is False:  # refused before any step, in one line by the CLI
            raise MisconfigurationException(
                "JointTraining distils the teacher features: set data.init_args.load_features: true "
                "(configs/ablations/strategy/joint.yaml does)"
            )

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        distill = [(f"distill_head.{n}", p) for n, p in self.distill_head.named_parameters()]
        return super().head_parameters() + distill

    def _joint_step(
        self, batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor, Any, Tensor, Tensor, Tensor]:
        """Both losses from one forward pass: ``(total, text, distill, out, targets, local_ids, cos)``."""
        out, targets, local_ids, used = self._scores(batch)
        text = self._loss(out, targets, local_ids, used, batch)
        pred = self.distill_head(out.patch_tokens)
        target, mask = distillation_targets(batch, out.centers, out.group_index, pred.shape[-1])
        distill = cosine_distillation_loss(pred, target, mask)
        cos = (pred.float() * target).sum(-1)[mask]
        return joint_loss(distill, text, self.joint_weight), text, distill, out, targets, local_ids, cos

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, text, distill, out, targets, local_ids, cos = self._joint_step(batch)
        bs = batch["points"].shape[0]
        with torch.no_grad():
            _, acc = self._patch_predictions(out, targets, local_ids, batch)
        self.train_acc(acc)
        self.train_cos(cos.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/text_loss", text.detach(), batch_size=bs)
        self.log("train/distill_loss", distill.detach(), batch_size=bs)
        self.log("train/patch_acc", self.train_acc, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/cosine", self.train_cos, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/logit_scale", self.logit_params.multiplier().detach(), batch_size=bs)
        self._log_skips()
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, text, distill, out, targets, local_ids, cos = self._joint_step(batch)
        patch_pred, acc = self._patch_predictions(out, targets, local_ids, batch)
        miou = point_miou(patch_pred, out.point_to_patch, batch["membership"], batch["label_mask"])
        bs = batch["points"].shape[0]
        self.val_acc(acc)
        self.val_cos(cos)
        if miou.numel():
            self.val_miou(miou)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/text_loss", text, batch_size=bs, sync_dist=True)
        self.log("val/distill_loss", distill, batch_size=bs, sync_dist=True)
        self.log("val/patch_acc", self.val_acc, on_epoch=True, batch_size=bs)
        self.log("val/cosine", self.val_cos, on_epoch=True, batch_size=bs)
        self.log("val/miou", self.val_miou, on_epoch=True, prog_bar=True, batch_size=bs)
