"""Downstream inference API: load an exported model and segment shapes by part name.

::

    from patchalign.pretrained import load_pretrained

    model = load_pretrained("exported/", device="cuda")
    seg = model.segment(points, ["wing", "tail", "body", "engine"])   # points: (N, 3) or (B, N, 3)
    seg.labels        # (N,) index into the names
    seg.scores        # (N, K) per-point probabilities over the names
    feats = model.encode(points)                                     # EncoderOutput (patch features...)

Plain ``nn.Module`` + safetensors: importing and using this module never imports Lightning (nor
the evaluation package). ``load_pretrained`` takes an export directory, a Lightning checkpoint or
the released ``patchalign3d.pt`` (dickoah/PatchAlign3D, arXiv 2601.02457; read by
:mod:`patchalign.checkpoints`). Names are encoded with the text encoder recorded at export time
(``patchalign.text.load_text_encoder``), averaged over the exported prompt templates; pass
``text_encoder=`` (an encoder or precomputed embeddings) or an embeddings tensor to avoid loading it.

The patch -> point label transfer (:func:`assign_point_labels`) lives here because inference needs
it (the benchmark evaluation calls it too). The default (``nearest``) is the released
``assign_points_from_patches`` / ``PatchAlignSegmenter.segment`` rule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin
from torch import Tensor, nn

from patchalign.checkpoints import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    effective_multiplier,
    load_encoder_state,
    read_checkpoint,
    write_export,
)
from patchalign.geometry import normalize_unit_sphere_centroid
from patchalign.grouping import squared_distances
from patchalign.losses import DEFAULT_LOGIT_SCALE
from patchalign.model import EncoderOutput, PatchAlignEncoder
from patchalign.text import DEFAULT_TEMPLATES, PartTextEmbedder

MIN_POINTS = 32  # one full patch (the released group size); fewer points cannot form a patch

AssignMode = Literal["nearest", "knn", "membership"]


@dataclass
class Segmentation:
    """Per-point part labels, from :meth:`PretrainedPatchAlign.segment` or :func:`assign_point_labels`.

    Attributes:
        labels: ``(N,)`` / ``(B, N)`` index into the part names (``-1``: below ``none_threshold``).
        scores: ``(N, K)`` / ``(B, N, K)`` per-point probabilities over the parts (0 on padding).
        patch_logits: ``(G, K)`` / ``(B, G, K)`` patch-part cosine similarities (``-inf`` on padding).
        part_names: the names, when :meth:`~PretrainedPatchAlign.segment` was given strings.
        encoding: the encoder output the labels came from (always batched), when known.
    """

    labels: Tensor
    scores: Tensor
    patch_logits: Tensor
    part_names: list[str] | None = None
    encoding: EncoderOutput | None = None


def assign_point_labels(
    patch_features: Tensor,
    text: Tensor,
    points: Tensor,
    centers: Tensor,
    point_to_patch: Tensor,
    part_mask: Tensor | None = None,
    group_index: Tensor | None = None,
    assign: AssignMode = "nearest",
    k: int = 3,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    none_threshold: float | None = None,
) -> Segmentation:
    """Score patches against part names and turn them into per-point labels (batched, no point loops).

    Args:
        patch_features: ``(B, G, D)`` L2-normalised.
        text: ``(K, D)`` shared by the batch or ``(B, K, D)`` per shape, L2-normalised.
        points: ``(B, N, 3)`` the points to label (same frame as ``centers``).
        centers: ``(B, G, 3)`` patch centres.
        point_to_patch: ``(B, N)`` nearest centre per point (used by ``nearest``).
        part_mask: ``(B, K)`` which of the ``K`` names belong to each shape (default: all).
        group_index: ``(B, G, S)`` patch members (needed by ``membership``).
        assign: ``nearest`` (released default), ``knn`` (inverse-distance vote of the ``k``
            nearest centres over softmax probabilities) or ``membership``.
        logit_scale: multiplies cosines before the softmax that gives ``scores`` (and the
            ``knn`` vote); it does not change ``nearest`` labels.
        none_threshold: label ``-1`` where the best cosine is below this. ``0.0`` reproduces Find3D's
            non-panoptic rule (a zero "no label" logit prepended before the softmax wins exactly
            when every part logit is negative); ``None`` (default) always picks a part.
    """
    b, g, d = patch_features.shape
    if text.dim() == 2:
        text = text[None].expand(b, -1, -1)
    if text.shape[0] != b or text.shape[-1] != d:
        raise ValueError(
            f"text embeddings {tuple(text.shape)} do not match patch features {tuple(patch_features.shape)}"
        )
    feats = patch_features.float()
    cos = torch.einsum("bgd,bkd->bgk", feats, text.to(feats))
    if part_mask is None:
        part_mask = torch.ones(b, text.shape[1], dtype=torch.bool, device=cos.device)
    neg_inf = torch.finfo(cos.dtype).min
    cos = cos.masked_fill(~part_mask[:, None, :], neg_inf)
    kk = cos.shape[-1]
    if assign == "nearest":
        point_cos = torch.gather(cos, 1, point_to_patch[..., None].expand(-1, -1, kk))
        scores = torch.softmax(point_cos * logit_scale, dim=-1)
        best_cos, labels = point_cos.max(-1)
    elif assign == "knn":
        k_eff = min(k, g)
        dist2, idx = squared_distances(points, centers).topk(k_eff, dim=-1, largest=False)  # (B, N, k)
        w = 1.0 / (dist2.sqrt() + 1e-6)
        w = w / w.sum(-1, keepdim=True)
        probs = torch.softmax(cos * logit_scale, dim=-1)  # (B, G, K)
        gathered = torch.gather(probs, 1, idx.reshape(b, -1)[..., None].expand(-1, -1, kk)).reshape(
            b, -1, k_eff, kk
        )
        scores = (gathered * w[..., None]).sum(2)
        labels = scores.argmax(-1)
        point_cos = torch.gather(cos, 1, point_to_patch[..., None].expand(-1, -1, kk))
        best_cos = point_cos.max(-1).values
    elif assign == "membership":
        if group_index is None:
            raise ValueError("assign='membership' needs group_index")
        n = points.shape[1]
        s = group_index.shape[-1]
        flat = group_index.reshape(b, g * s)
        src = (
            cos.masked_fill(~part_mask[:, None, :], 0.0)[:, :, None, :]
            .expand(-1, -1, s, -1)
            .reshape(b, g * s, kk)
        )
        summed = cos.new_zeros(b, n, kk).scatter_add_(1, flat[..., None].expand(-1, -1, kk), src)
        counts = cos.new_zeros(b, n).scatter_add_(1, flat, torch.ones_like(flat, dtype=cos.dtype))
        nearest = torch.gather(cos, 1, point_to_patch[..., None].expand(-1, -1, kk))
        # Points in no kNN group fall back to their nearest patch (the released code gave them 0 logits).
        point_cos = torch.where(counts[..., None] > 0, summed / counts.clamp_min(1)[..., None], nearest)
        point_cos = point_cos.masked_fill(~part_mask[:, None, :], neg_inf)
        scores = torch.softmax(point_cos * logit_scale, dim=-1)
        best_cos, labels = point_cos.max(-1)
    else:
        raise ValueError(f"unknown assign mode {assign!r}; use nearest, knn or membership")
    if none_threshold is not None:
        labels = torch.where(best_cos < none_threshold, torch.full_like(labels, -1), labels)
    return Segmentation(
        labels=labels,
        scores=scores,
        patch_logits=cos.masked_fill(~part_mask[:, None, :], float("-inf")),
    )


class PretrainedPatchAlign(
    nn.Module,
    ModelHubMixin,
    library_name="patchalign",
    tags=["patchalign3d", "3d", "point-cloud", "part-segmentation", "zero-shot"],
    paper_url="https://arxiv.org/abs/2601.02457",
    license="mit",
):
    """An exported PatchAlign3D encoder with its text-alignment settings.

    Hugging Face Hub (``huggingface_hub.ModelHubMixin``): :meth:`from_pretrained` takes an export
    directory or a Hub repo id (resolved through the Hub cache; ``HF_HUB_OFFLINE=1`` and
    ``local_files_only`` are respected), :meth:`save_pretrained` writes the export layout
    (``model.safetensors`` + ``config.json``, plus a model card), :meth:`push_to_hub` uploads it. A
    repo that holds the released ``patchalign3d.pt`` instead (``patchalign3d/patchalign3d-encoder``)
    loads too. Loading is strict, as :func:`load_pretrained` is.

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
        self.templates: list[str] = list(config.get("templates") or DEFAULT_TEMPLATES)
        self.logit: dict[str, Any] = dict(config.get("logit") or {"form": "none"})
        self._text_encoder: Any = None

    # ---------------------------------------------------------------- Hugging Face Hub

    def _save_pretrained(self, save_directory: Path) -> None:
        """The export layout :func:`load_pretrained` reads (written before the mixin's model card)."""
        provenance = {k: self.config[k] for k in ("source",) if self.config.get(k) is not None}
        write_export(
            self.encoder,
            save_directory,
            text_encoder=self.text_encoder_id,
            templates=self.templates,
            logit=self.logit,
            provenance=provenance,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        proxies: dict | None,
        resume_download: bool | None,
        local_files_only: bool,
        token: str | bool | None,
        device: str | torch.device = "cpu",
        strict: bool = True,
        **ignored: Any,
    ) -> PretrainedPatchAlign:
        """Resolve ``model_id`` to a local folder (itself, or a Hub snapshot) and load it strictly.

        ``ignored`` holds what the mixin read from ``config.json`` for ``__init__`` (``encoder``,
        ``config``): the weights and architecture are read by :func:`load_pretrained` instead.
        """
        path = Path(model_id)
        if not path.exists():
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    repo_id=model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    proxies=proxies,
                    token=token,
                    local_files_only=local_files_only,
                    allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*.pt", "*.ckpt", "README.md"],
                )
            )
        if path.is_dir() and not (path / CONFIG_NAME).is_file():
            weights = sorted(path.glob("*.pt")) + sorted(path.glob("*.ckpt"))
            if len(weights) != 1:
                raise FileNotFoundError(
                    f"{model_id}: no config.json + model.safetensors export, and "
                    f"{len(weights)} checkpoint files (*.pt, *.ckpt) instead of one"
                )
            path = weights[0]
        return load_pretrained(path, device=device, strict=strict)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def logit_scale_value(self) -> float:
        """Multiplier of cosine similarities used for probabilities (temperature inverse)."""
        return effective_multiplier(self.logit)

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
        if normalize:  # the model's input convention: centroid, farthest point at radius 1
            points = normalize_unit_sphere_centroid(points)
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
        num_points: int | None = 2048,
        seed: int = 0,
    ) -> Segmentation:
        """Label every point with one of ``parts``, at the scale the model was trained on.

        A shape with more than ``num_points`` points is not encoded whole (its 32-point patches would
        be far smaller than any the model saw in training): ``num_points`` of its points, drawn
        without replacement by a generator seeded with ``seed``, are normalised and encoded, and every
        input point takes the labels and scores of its nearest drawn point
        (:mod:`patchalign.segment`; the released segmenter's rule for display points). ``encoding``
        and ``patch_logits`` then describe the drawn sample. Smaller shapes are encoded whole.

        Args:
            points: ``(N, 3)`` or ``(B, N, 3)``; at least 32 finite points per shape.
            parts: part names, or an ``(K, D)`` tensor of text embeddings (normalised here).
            text_encoder: encoder or precomputed ``{name: vector}`` / ``TextBank`` for the names
                (default: the exported text encoder).
            category: object category for templates that use it.
            assign, k, none_threshold: see :func:`assign_point_labels`.
            num_points: the trained input size (``None``: encode every point, whatever the size).
            seed: seed of the point draw.
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
        nearest = None
        if num_points is not None and n > num_points:
            from patchalign.segment import draw_indices, nearest_sample_index

            idx = torch.stack([draw_indices(pts.shape[1], num_points, seed, pts.device)] * pts.shape[0])
            drawn = torch.gather(pts, 1, idx[..., None].expand(-1, -1, 3))
            nearest = torch.stack([nearest_sample_index(pts[b], drawn[b]) for b in range(pts.shape[0])])
            pts, n = (normalize_unit_sphere_centroid(drawn) if normalize else drawn), num_points
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
        labels, scores, logits = pred.labels, pred.scores, pred.patch_logits
        if nearest is not None:  # back to every input point
            nearest = nearest.to(labels.device)
            labels = torch.gather(labels, 1, nearest)
            scores = torch.gather(scores, 1, nearest[..., None].expand(-1, -1, scores.shape[-1]))
        if unbatched:
            labels, scores, logits = labels[0], scores[0], logits[0]
        return Segmentation(labels=labels, scores=scores, patch_logits=logits, part_names=names, encoding=out)

    def segment_mesh(self, mesh: Any, parts: Sequence[str] | Tensor, **kwargs: Any) -> Any:
        """Label every vertex and face of a mesh: a path (anything :func:`patchalign.io.load_geometry`
        reads), a ``trimesh.Trimesh`` or a ``(vertices, faces)`` pair. Returns a
        :class:`patchalign.segment.FullSegmentation` (``vertex_labels``, ``face_labels``, scores); a
        point-cloud file gives ``point_labels`` instead. ``kwargs``: ``num_points``, ``votes``,
        ``rotate``, ``seed``, ``text_encoder`` (see :func:`patchalign.segment.segment_shape`).
        """
        from patchalign.io import load_geometry
        from patchalign.segment import segment_shape

        if isinstance(mesh, (str, os.PathLike)):
            vertices, faces = load_geometry(mesh)
        elif isinstance(mesh, tuple):
            vertices, faces = mesh
        else:  # a trimesh.Trimesh (or anything with vertices / faces)
            vertices, faces = np.asarray(mesh.vertices), np.asarray(getattr(mesh, "faces", None))
        if faces is None or len(faces) == 0 or np.ndim(faces) != 2:
            faces = None
        return segment_shape(self, vertices, parts, faces, **kwargs)


def load_pretrained(
    path: str | os.PathLike, device: str | torch.device = "cpu", strict: bool = True
) -> PretrainedPatchAlign:
    """Load an export directory (:func:`patchalign.tools.export.export_checkpoint`), a Lightning
    checkpoint or a released PatchAlign3D ``patchalign3d.pt`` file; a Hugging Face repo id
    (``org/name``, no such local path) goes through :meth:`PretrainedPatchAlign.from_pretrained`.

    Args:
        strict: refuse weights that do not match the architecture exactly (default); ``False``
            loads the matching tensors and logs the counts.

    Raises:
        FileNotFoundError: nothing at ``path``, or an export directory lacks ``config.json`` or
            ``model.safetensors``.
        ValueError: not a known format, no projection head, or (strict) the weights do not fit
            the config; missing / unexpected / mis-shaped tensors are listed
            (:class:`patchalign.checkpoints.CheckpointError`).
    """
    p = Path(path)
    if not p.exists() and _looks_like_repo_id(str(path)):
        return PretrainedPatchAlign.from_pretrained(str(path), device=device, strict=strict)
    if p.is_dir():
        for f in (p / CONFIG_NAME, p / WEIGHTS_NAME):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: {p} is not an exported patchalign model")
    ckpt = read_checkpoint(p)
    if ckpt.encoder_config is None:
        raise CheckpointError(f"{p}: no encoder config recorded; cannot rebuild the encoder")
    if not ckpt.has_head:
        raise CheckpointError(f"{p}: no projection head ({ckpt.kind} file); nothing to segment with")
    encoder = PatchAlignEncoder(ckpt.encoder_config)
    load_encoder_state(encoder, ckpt.state, strict=strict, source=str(p))
    config = {
        "encoder": ckpt.encoder_config.to_dict(),
        "text_encoder": ckpt.text_encoder,
        "logit": ckpt.logit,
        "templates": ckpt.templates,
        "source": ckpt.kind,
    }
    return PretrainedPatchAlign(encoder, config).to(device).eval()


def _looks_like_repo_id(spec: str) -> bool:
    """``org/name`` as the Hub spells repo ids (not an absolute, relative or home path, no suffix)."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None and not spec.endswith(
        (".pt", ".ckpt", ".safetensors", ".json")
    )
