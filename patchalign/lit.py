"""Thin LightningModules for the two training stages.

The encoder (:class:`patchalign.model.PatchAlignEncoder`) and the losses (:mod:`patchalign.losses`)
are plain torch; these classes only wire them to batches, optimisers, logging and checkpoints.

Batches come from :class:`patchalign.data.datamodule.ShardDataModule`::

    points (B, P, 3)  features (B, P, C)  membership (B, P, L)  label_ids (B, L)  label_mask (B, L)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from patchalign.grouping import gather_points, patch_membership_fraction
from patchalign.losses import (
    ScaleLogitParams,
    SigmoidLogitParams,
    cosine_distillation_loss,
    per_shape_bce_loss,
    sigmoid_patch_text_loss,
)
from patchalign.model import PatchAlignEncoder

log = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("logit_scale", "logit_bias", "cls_token", "cls_pos")


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


def _param_groups(
    named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, decay_all: bool
) -> list[dict]:
    """Split parameters into decayed and non-decayed groups (no decay on norms, biases, t, b)."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _NO_DECAY_NAMES)
        (no_decay if (skip and not decay_all) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


class _StageBase(L.LightningModule):
    """Shared optimiser, schedule and encoder bookkeeping of both stages."""

    encoder: PatchAlignEncoder

    # hyper-parameters (lr, head_lr, weight_decay, warmup_steps, cosine_schedule, min_lr_ratio,
    # decay_all_params) are saved by the subclasses' save_hyperparameters() and read from self.hparams
    def __init__(self) -> None:
        super().__init__()

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
        hp = self.hparams
        head = self.head_parameters()
        head_ids = {id(p) for _, p in head}
        body = [(n, p) for n, p in self.named_parameters() if id(p) not in head_ids]
        groups = _param_groups(body, hp.lr, hp.weight_decay, hp.decay_all_params)
        groups += _param_groups(head, hp.head_lr, hp.weight_decay, hp.decay_all_params)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not hp.cosine_schedule:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _log_skips(self) -> None:
        """Log the data module's per-reason skip counts (bad samples are counted, never silent)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        metrics = getattr(dm, "skip_metrics", None)
        if callable(metrics) and self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_dict(metrics(), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=False)


class Stage1Distillation(_StageBase):
    """Stage 1: distil back-projected teacher (DINOv2) features into the patches; all layers train.

    Args:
        encoder: the backbone with a head as wide as the teacher features (768 for DINOv2-base).
        lr: learning rate of everything but the head.
        head_lr: learning rate of the projection head.
        weight_decay: AdamW decay on weight matrices (not on norms, biases and tokens).
        warmup_steps: linear warm-up steps.
        cosine_schedule: cosine decay to ``min_lr_ratio`` after warm-up.
        decay_all_params: also decay norms/biases/tokens (what a plain AdamW(model.parameters()) does).
        target_widths: set by the CLI from the data (``{"features": C, "text": D}``); the head is
            rebuilt to ``features`` width if it differs, so the width is never typed twice.
    """

    def __init__(
        self,
        encoder: PatchAlignEncoder,
        lr: float = 1e-4,
        head_lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 500,
        cosine_schedule: bool = True,
        min_lr_ratio: float = 0.01,
        decay_all_params: bool = False,
        target_widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
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

    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        out = self.encoder(batch["points"])
        feats = batch["features"]
        if feats.shape[-1] != out.patch_features.shape[-1]:
            raise ValueError(
                f"teacher features have width {feats.shape[-1]} but the head outputs "
                f"{out.patch_features.shape[-1]}: set the encoder's head_dim to the teacher width"
            )
        target, mask = patch_feature_targets(feats, out.group_index)
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


def load_encoder_weights(encoder: PatchAlignEncoder, path: str | Path, skip_head: bool = True) -> list[str]:
    """Load encoder weights from a Lightning checkpoint or an export directory into ``encoder``.

    The head is skipped by default (Stage 2 trains a new head of the text width). Returns the names
    of encoder parameters that were not found in the checkpoint (logged as a warning).
    """
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt.get("state_dict", ckpt)
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} or dict(state)
    if skip_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = encoder.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"checkpoint {path} does not match the encoder architecture: {mismatched[:5]}")
    result = encoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (skip_head and k.startswith("head."))]
    if missing:
        log.warning(
            "init_from %s: %d encoder parameters not in checkpoint: %s", path, len(missing), missing[:5]
        )
    return missing


class Stage2Alignment(_StageBase):
    """Stage 2: align patch features with part-name text embeddings.

    Starts from a Stage 1 checkpoint (``init_from``), freezes the first ``freeze_blocks`` blocks and
    everything before them, and trains the last blocks, the final norm, a new head of the text width
    and the logit parameters.

    Args:
        encoder: backbone whose ``head_dim`` equals the text-bank width (linked by the CLI).
        init_from: Stage 1 Lightning checkpoint or export directory (``None``: random init, tests).
        loss: ``"siglip"`` (the talk: all patch–text pairs in the batch, learnable t and b) or
            ``"bce"`` (the released code: per-shape BCE over the shape's own labels).
        freeze_blocks: number of leading transformer blocks to freeze (default: all but the last,
            i.e. 11 of 12).
        frozen_train_mode: keep frozen modules in train mode (BatchNorm statistics update, drop-path
            active) as the released code did; off by default so frozen means frozen.
        text_bank: path of the text bank (by default the data module's); the vectors are held in
            a non-persistent buffer, never in checkpoints.
        target_widths: set by the CLI from the data; the head is rebuilt to the ``text`` width.
        init_head: also load the head from ``init_from`` (evaluating a Stage 2 checkpoint or an
            export directory) instead of starting a new one (Stage 1 → Stage 2).
        eval_text_encoder: text encoder spec for ``test`` on a benchmark (``EvalDataModule``), e.g.
            ``open_clip:ViT-bigG-14@laion2b_s39b_b160k``; it must be the encoder the head was aligned to.
        eval_templates: prompt template preset for evaluation (``part_only`` = the released one).
        eval_assign: patch → point label transfer (``nearest`` patch centre = the released one).
        eval_out_dir: where ``test`` writes its per-category table (CSV/JSON); default: the log dir.
        Other arguments as :class:`Stage1Distillation`.
    """

    def __init__(
        self,
        encoder: PatchAlignEncoder,
        init_from: str | None = None,
        loss: Literal["siglip", "bce"] = "siglip",
        freeze_blocks: int | None = None,
        frozen_train_mode: bool = False,
        text_bank: str | None = None,
        lr: float = 1e-4,
        head_lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        cosine_schedule: bool = True,
        min_lr_ratio: float = 0.01,
        decay_all_params: bool = False,
        target_widths: dict[str, int] | None = None,
        init_head: bool = False,
        eval_text_encoder: str | None = None,
        eval_templates: str = "part_only",
        eval_assign: Literal["nearest", "knn", "membership"] = "nearest",
        eval_out_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
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
            SigmoidLogitParams() if loss == "siglip" else ScaleLogitParams()
        )
        if init_from:
            load_encoder_weights(encoder, init_from, skip_head=not init_head)
        self._eval_embedder: Any = None
        self.evaluator: Any = None
        self.frozen_modules = self._freeze(freeze_blocks)
        self.train()  # puts the frozen modules in eval mode from the start
        self.register_buffer("text_vectors", torch.empty(0), persistent=False)
        self.text_names: list[str] = []
        if text_bank:
            self.set_text_bank(text_bank)
        self.train_acc = MeanMetric()
        self.val_acc = MeanMetric()
        self.val_miou = MeanMetric()

    def _freeze(self, n: int) -> list[nn.Module]:
        enc = self.encoder
        frozen: list[nn.Module] = []
        if n > 0:
            frozen = [enc.encoder, enc.reduce_dim, enc.pos_embed, *enc.blocks[:n]]
            for p in (enc.cls_token, enc.cls_pos):
                p.requires_grad_(False)
        for m in frozen:
            m.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> Stage2Alignment:
        super().train(mode)
        if mode and not self.hparams.frozen_train_mode:
            for m in self.frozen_modules:
                m.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores per-module modes captured at construction time around validation, which
        # would put the frozen modules back in train mode; enforce eval mode before every step.
        if not self.hparams.frozen_train_mode:
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
        dm = getattr(self.trainer, "datamodule", None)
        if stage in ("test", "predict") and getattr(dm, "test_dataset", None) is not None:
            return  # benchmark evaluation: part names are encoded by the eval text encoder instead
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
        if self.hparams.loss == "siglip":  # all of the batch's names: other shapes' are negatives
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
            z, text, y, batch["label_mask"], self.logit_params.logit_scale, self.logit_params.max_scale
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

    @staticmethod
    def _point_miou(out: Any, patch_pred: Tensor, batch: dict[str, Any]) -> Tensor:
        """Per-shape point mIoU (released convention): nearest patch's label vs the point's first part."""
        from patchalign.eval.metrics import per_shape_miou

        memb = batch["membership"] > 0.5
        has = memb.any(-1)
        gt = torch.where(has, memb.float().argmax(-1), -1)
        pred = torch.where(has, torch.gather(patch_pred, 1, out.point_to_patch), -1)
        k = batch["label_mask"].sum(1)
        keep = k > 0  # padded validation shapes have no parts
        if not keep.any():
            return patch_pred.new_zeros(0, dtype=torch.float32)
        miou = per_shape_miou(pred[keep], gt[keep], k[keep])[:, 0].float()  # column 0: released
        return miou[~miou.isnan()]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out, targets, local_ids, used = self._scores(batch)
        loss = self._loss(out, targets, local_ids, used, batch)
        bs = batch["points"].shape[0]
        with torch.no_grad():
            _, acc = self._patch_predictions(out, targets, local_ids, batch)
        self.train_acc(acc)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/patch_acc", self.train_acc, on_step=True, on_epoch=True, batch_size=bs)
        self.log(
            "train/logit_scale",
            self.logit_params.logit_scale.detach().exp()
            if self.hparams.loss == "siglip"
            else self.logit_params.logit_scale.detach(),
            batch_size=bs,
        )
        if self.hparams.loss == "siglip":
            self.log("train/logit_bias", self.logit_params.logit_bias.detach(), batch_size=bs)
        self._log_skips()
        return loss

    # ----------------------------------------------------------------- benchmark evaluation (test)
    def _embedder(self) -> Any:
        if self._eval_embedder is None:
            spec = self.hparams.eval_text_encoder or self.hparams.get("text_encoder")
            if not spec:
                raise RuntimeError(
                    "zero-shot evaluation needs the text encoder the head was aligned to: set "
                    "model.init_args.eval_text_encoder (e.g. open_clip:ViT-bigG-14@laion2b_s39b_b160k)"
                )
            from patchalign.eval.zeroshot import PartTextEmbedder
            from patchalign.text import load_text_encoder

            self._eval_embedder = PartTextEmbedder(load_text_encoder(spec), self.hparams.eval_templates)
        return self._eval_embedder

    def on_test_epoch_start(self) -> None:
        from patchalign.eval.evaluator import PartSegEvaluator

        dataset = getattr(self.trainer.datamodule, "test_dataset", None)
        self.evaluator = (
            PartSegEvaluator.from_dataset(dataset).to(self.device) if dataset is not None else None
        )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.evaluator is None:  # a shard set: same metrics as validation
            return self.validation_step(batch, batch_idx)
        from patchalign.eval.zeroshot import zero_shot_predict

        pred = zero_shot_predict(self.encoder, batch, self._embedder(), assign=self.hparams.eval_assign)
        self.evaluator.update(
            pred.labels,
            batch["labels"],
            batch["category"],
            num_parts=[len(p) for p in batch["part_names"]],
            shape_ids=batch["index"],
        )
        return None

    def on_test_epoch_end(self) -> None:
        if self.evaluator is None:
            return
        report = self.evaluator.compute()
        self.log_dict(report.log_dict("test/"), rank_zero_only=True)
        if self.trainer.is_global_zero:
            out = Path(self.hparams.eval_out_dir or self.trainer.default_root_dir) / "eval"
            csv_path, json_path = report.save(out)
            print(report.format_table())
            print(f"per-category results: {csv_path} and {json_path}")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, targets, local_ids, used = self._scores(batch)
        loss = self._loss(out, targets, local_ids, used, batch)
        patch_pred, acc = self._patch_predictions(out, targets, local_ids, batch)
        miou = self._point_miou(out, patch_pred, batch)
        bs = batch["points"].shape[0]
        self.val_acc(acc)
        if miou.numel():
            self.val_miou(miou)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/patch_acc", self.val_acc, on_epoch=True, batch_size=bs)
        self.log("val/miou", self.val_miou, on_epoch=True, prog_bar=True, batch_size=bs)
