"""Downstream inference API: load an exported model and segment shapes by part name.

::

    from patchalign.pretrained import load_pretrained

    model = load_pretrained("exported/", device="cuda")
    seg = model.segment(points, ["wing", "tail", "body", "engine"])   # points: (N, 3) or (B, N, 3)
    seg.labels        # (N,) index into the names
    seg.scores        # (N, K) per-point probabilities over the names
    feats = model.encode(points)                                     # EncoderOutput (patch features...)

Plain ``nn.Module`` + safetensors: importing and using this module never imports Lightning. Names
are encoded with the text encoder recorded at export time (``patchalign.text.load_text_encoder``),
averaged over the exported prompt templates; pass ``text_encoder=`` (an encoder or precomputed
embeddings) or an embeddings tensor to avoid loading it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from patchalign.eval.zeroshot import AssignMode, PartTextEmbedder, assign_point_labels
from patchalign.model import EncoderConfig, EncoderOutput, PatchAlignEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "patchalign-pretrained"
MIN_POINTS = 32  # one full patch (the released group size); fewer points cannot form a patch


@dataclass
class Segmentation:
    """Result of :meth:`PretrainedPatchAlign.segment` (unbatched input -> unbatched fields).

    Attributes:
        labels: ``(N,)`` / ``(B, N)`` index into ``part_names`` (``-1``: below ``none_threshold``).
        scores: ``(N, K)`` / ``(B, N, K)`` per-point probabilities over the parts.
        patch_logits: ``(G, K)`` / ``(B, G, K)`` patch-part cosine similarities.
        part_names: the names, when given as strings.
        encoding: the encoder output the labels came from (always batched).
    """

    labels: Tensor
    scores: Tensor
    patch_logits: Tensor
    part_names: list[str] | None
    encoding: EncoderOutput


class PretrainedPatchAlign(nn.Module):
    """An exported PatchAlign3D encoder with its text-alignment settings.

    Attributes:
        encoder: the :class:`PatchAlignEncoder` (head included).
        text_encoder_id: spec of the text encoder the head was aligned to (``None`` if unknown).
        templates: prompt templates averaged per part name.
        logit: ``{"form": "sigmoid"|"scale"|"none", "scale", "bias"}`` from training.
    """

    def __init__(self, encoder: PatchAlignEncoder, config: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.config = config
        self.text_encoder_id: str | None = config.get("text_encoder")
        self.templates: list[str] = list(config.get("templates") or ["{part}", "a {part}", "{part} part"])
        self.logit: dict[str, Any] = dict(config.get("logit") or {"form": "none"})
        self._text_encoder: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def logit_scale_value(self) -> float:
        """Multiplier of cosine similarities used for probabilities (temperature inverse)."""
        form, scale = self.logit.get("form"), self.logit.get("scale")
        if form == "sigmoid" and scale is not None:
            return math.exp(scale)
        if form == "scale" and scale is not None:
            return min(scale, 100.0)
        return 1.0 / 0.07

    # ---------------------------------------------------------------- input checking

    def _prepare(self, points: Any, normalize: bool) -> tuple[Tensor, bool, int]:
        if isinstance(points, np.ndarray):
            points = torch.from_numpy(np.ascontiguousarray(points))
        if not isinstance(points, Tensor):
            raise TypeError(f"points must be a numpy array or torch tensor, got {type(points).__name__}")
        if not (points.is_floating_point() or points.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"points must be numeric, got dtype {points.dtype}")
        shape_in = tuple(points.shape)
        unbatched = points.dim() == 2
        if unbatched:
            points = points[None]
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must be (N, 3) or (B, N, 3), got shape {shape_in}")
        n = points.shape[1]
        if n < MIN_POINTS or n < self.encoder.config.group_size:
            raise ValueError(
                f"need at least {max(MIN_POINTS, self.encoder.config.group_size)} points per shape, got {n}"
            )
        points = points.to(self.device, torch.float32)
        bad = ~torch.isfinite(points)
        if bad.any():
            raise ValueError(f"points contain {int(bad.any(-1).sum())} non-finite (NaN/Inf) coordinates")
        if normalize:
            points = points - points.mean(1, keepdim=True)
            radius = points.norm(dim=-1).amax(1, keepdim=True)[..., None]
            if (radius == 0).any():
                raise ValueError("a shape has all its points at one location; it cannot be normalised")
            points = points / radius
        # FPS needs num_groups distinct candidates: repeat the cloud cyclically if it is smaller.
        if n < self.encoder.config.num_groups:
            reps = math.ceil(self.encoder.config.num_groups / n)
            points = points.repeat(1, reps, 1)[:, : self.encoder.config.num_groups]
        return points, unbatched, n

    # ---------------------------------------------------------------- API

    @torch.inference_mode()
    def encode(self, points: Any, normalize: bool = True) -> EncoderOutput:
        """Patch features of ``(N, 3)`` or ``(B, N, 3)`` points (returned batched, ``B = 1`` for one shape).

        ``normalize`` centres each shape and scales it into the unit sphere (the training
        convention); pass ``False`` for clouds that already are. ``point_to_patch`` and
        ``group_index`` refer to the input points (for inputs smaller than ``num_groups`` the cloud
        is repeated internally; the extra rows are dropped again).
        """
        pts, _, n = self._prepare(points, normalize)
        return self._run(pts, n)

    def _run(self, pts: Tensor, n: int) -> EncoderOutput:
        """Encode the (possibly cyclically repeated) cloud; outputs refer to the first ``n`` points."""
        out = self.encoder(pts)
        if pts.shape[1] == n:
            return out
        return EncoderOutput(
            out.patch_features,
            out.patch_tokens,
            out.centers,
            out.group_index % n,  # row i + j*n of the repeated cloud is input point i
            out.point_to_patch[:, :n],
            out.cls_token,
        )

    def text_embeddings(
        self, part_names: Sequence[str], text_encoder: Any = None, category: str | None = None
    ) -> Tensor:
        """``(K, D)`` embeddings of ``part_names`` with the exported templates."""
        if isinstance(part_names, str):
            raise TypeError("part_names must be a list of strings, not a single string")
        if len(part_names) == 0:
            raise ValueError("part_names is empty: give at least one part name")
        if not all(isinstance(n, str) and n.strip() for n in part_names):
            raise ValueError(f"part names must be non-empty strings, got {list(part_names)}")
        source = text_encoder if text_encoder is not None else self._default_text_encoder()
        return PartTextEmbedder(source, self.templates, device=self.device).embed(list(part_names), category)

    def _default_text_encoder(self) -> Any:
        if self._text_encoder is None:
            if not self.text_encoder_id:
                raise ValueError(
                    "this export records no text encoder: pass text_encoder= or an embeddings tensor"
                )
            from patchalign.text import load_text_encoder

            self._text_encoder = load_text_encoder(self.text_encoder_id)
        return self._text_encoder

    @torch.inference_mode()
    def segment(
        self,
        points: Any,
        parts: Sequence[str] | Tensor,
        text_encoder: Any = None,
        category: str | None = None,
        assign: AssignMode = "nearest",
        k: int = 3,
        none_threshold: float | None = None,
        normalize: bool = True,
    ) -> Segmentation:
        """Label every point with one of ``parts``.

        Args:
            points: ``(N, 3)`` or ``(B, N, 3)``; at least 32 finite points per shape.
            parts: part names, or an ``(K, D)`` tensor of text embeddings (normalised here).
            text_encoder: encoder or precomputed ``{name: vector}`` / ``TextBank`` for the names
                (default: the exported text encoder).
            category: object category for templates that use it.
            assign, k, none_threshold: see :func:`patchalign.eval.zeroshot.assign_point_labels`.
        """
        if isinstance(parts, Tensor):
            text = parts.to(self.device, torch.float32)
            if text.dim() != 2 or text.shape[0] == 0:
                raise ValueError(
                    f"text embeddings must be a non-empty (K, D) tensor, got {tuple(text.shape)}"
                )
            names = None
        else:
            text = self.text_embeddings(parts, text_encoder, category)
            names = list(parts)
        d = self.encoder.config.head_dim or self.encoder.config.trans_dim
        if text.shape[1] != d:
            raise ValueError(
                f"text embeddings have dim {text.shape[1]} but the model's patch features have dim {d}"
            )
        if not torch.isfinite(text).all() or (text.norm(dim=1) == 0).any():
            raise ValueError("text embeddings contain NaN/Inf or zero vectors")
        text = F.normalize(text, dim=-1)
        pts, unbatched, n = self._prepare(points, normalize)
        out = self._run(pts, n)
        pts = pts[:, :n]
        pred = assign_point_labels(
            out.patch_features,
            text,
            pts,
            out.centers,
            out.point_to_patch,
            group_index=out.group_index,
            assign=assign,
            k=k,
            logit_scale=self.logit_scale_value,
            none_threshold=none_threshold,
        )
        labels, scores, logits = pred.labels, pred.point_scores, pred.patch_logits
        if unbatched:
            labels, scores, logits = labels[0], scores[0], logits[0]
        return Segmentation(labels=labels, scores=scores, patch_logits=logits, part_names=names, encoding=out)


def load_pretrained(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> PretrainedPatchAlign:
    """Load a directory written by :func:`patchalign.export.export_checkpoint`.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the files are not a patchalign export or the weights do not fit the config.
    """
    out = Path(out_dir)
    cfg_file, weights = out / CONFIG_NAME, out / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {out} is not an exported patchalign model")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a patchalign export (format={config.get('format')!r})")
    encoder = PatchAlignEncoder(EncoderConfig.from_dict(config["encoder"]))
    state = load_file(str(weights))
    enc_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(enc_state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match {cfg_file}: {e}") from e
    return PretrainedPatchAlign(encoder, config).to(device).eval()
