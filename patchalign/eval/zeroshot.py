"""The zero-shot part-segmentation protocol: part names -> text embeddings -> patch scores -> point labels.

Steps (defaults reproduce the released PatchAlign3D evaluation):

1. **Names and prompts.** Each part name is expanded with prompt templates, every prompt is encoded
   and L2-normalised, the prompts of a name are averaged and re-normalised
   (:class:`PartTextEmbedder`). Presets: ``part_only`` (released default: ``"{}"``, ``"a {}"``,
   ``"{} part"``), ``part_plus_cat``, ``ensemble`` (both, released ``--text_setting``), ``find3d``
   (``"{part} of a {category}"``, Find3D's ``decorated`` queries).
2. **Patch scores.** Cosine similarity of every patch feature with the names of the shape's *own*
   category only; other categories' names cannot win (released: logits of the 50-name bank outside
   the category masked to ``-1e4``).
3. **Points.** Each point takes the label of its nearest patch centre (released default,
   :attr:`EncoderOutput.point_to_patch`), or a distance-weighted vote of its ``k`` nearest centres,
   or the mean logits of the patches whose kNN group contains it (released ``--assign membership``).

Text comes from any object with ``encode(list[str]) -> (L, D)`` L2-normalised tensor (the
``patchalign.text`` encoders), or from precomputed per-name embeddings: a ``{name: vector}``
mapping or a :class:`patchalign.data.textbank.TextBank`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from patchalign.grouping import squared_distances

log = logging.getLogger(__name__)

PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Released PatchAlign3D (PART_ONLY_TEMPLATES / PART_PLUS_CAT_TEMPLATES of its eval.py).
    "part_only": ("{part}", "a {part}", "{part} part"),
    "part_plus_cat": (
        "a {part} of a {category}",
        "the {part} of a {category}",
        "{part} of {category}",
        "a {part} part of a {category}",
    ),
    "ensemble": (
        "a {part} of a {category}",
        "the {part} of a {category}",
        "{part} of {category}",
        "a {part} part of a {category}",
        "{part}",
        "a {part}",
        "{part} part",
    ),
    # Find3D's decorated query: f"{part} of a {classname}" with the lower-case class name, uncleaned.
    "find3d": ("{part} of a {category}",),
}
_RAW_PRESETS = {"find3d"}  # presets whose names are used verbatim (no punctuation stripping)

AssignMode = Literal["nearest", "knn", "membership"]


@runtime_checkable
class TextEncoderLike(Protocol):
    """What :mod:`patchalign.text` encoders provide."""

    id: str

    def encode(self, names: list[str]) -> Tensor: ...


TextSource = TextEncoderLike | Mapping[str, Tensor] | Any  # Any: a TextBank (names, vectors, lookup)


def clean_text(s: str) -> str:
    """The released code's ``_clean_text``: lower case, ``_`` and punctuation -> space, single spaces."""
    s = s.strip().lower().replace("_", " ")
    s = re.sub(r"[^\w\s]", " ", s, flags=re.UNICODE)
    return re.sub(r"\s+", " ", s).strip()


def build_prompts(part: str, category: str | None, templates: str | Sequence[str]) -> list[str]:
    """The prompts for one part name.

    Templates use ``{part}`` and ``{category}`` (or positional ``{}`` slots: part, then category);
    templates needing a category are dropped when there is none (the released code falls back to
    ``part_only`` then too).
    """
    preset = templates if isinstance(templates, str) else None
    tpls = PROMPT_TEMPLATES[templates] if isinstance(templates, str) else tuple(templates)
    if preset in _RAW_PRESETS:
        part_t, cat_t = part, (category.lower() if category else None)
    else:
        part_t, cat_t = clean_text(part), (clean_text(category) if category else None)
    out = []
    for t in tpls:
        slots = t.count("{}")  # positional templates as stored by the released code / text banks
        if slots:
            if slots == 1:
                out.append(t.format(part_t))
            elif slots == 2 and cat_t:
                out.append(t.format(part_t, cat_t))
        elif cat_t or "{category}" not in t:
            out.append(t.format(part=part_t, category=cat_t))
    if not out:
        out = [t.format(part=part_t) for t in PROMPT_TEMPLATES["part_only"]]
    return out


def _is_text_bank(obj: Any) -> bool:
    return hasattr(obj, "vectors") and hasattr(obj, "lookup") and hasattr(obj, "names")


class PartTextEmbedder:
    """Per-part text embeddings with prompt averaging and a cache keyed by ``(part, category)``.

    Args:
        source: a text encoder (``.encode(list[str])``), a ``{name: (D,) tensor}`` mapping, or a
            ``TextBank``. Precomputed embeddings are looked up per *name* (as given, then cleaned),
            i.e. they are taken to already include whatever prompt averaging their producer did.
        templates: preset name (:data:`PROMPT_TEMPLATES`) or explicit templates.
        device: where the returned embeddings live.
    """

    def __init__(
        self,
        source: TextSource,
        templates: str | Sequence[str] = "part_only",
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(templates, str) and templates not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown template preset {templates!r}; use one of {list(PROMPT_TEMPLATES)}")
        self.source = source
        self.templates = templates
        self.device = torch.device(device) if device is not None else None
        self._cache: dict[tuple[str, str | None], Tensor] = {}
        if isinstance(source, Mapping) or _is_text_bank(source):
            self.kind = "bank"
        elif hasattr(source, "encode"):
            self.kind = "encoder"
        else:
            raise TypeError(
                f"text source must be a text encoder, a name->vector dict or a TextBank, not {type(source)}"
            )

    @property
    def id(self) -> str:
        """Identifier of the text model behind the embeddings (for reports and exports)."""
        for attr in ("id", "encoder_id"):
            v = getattr(self.source, attr, None)
            if isinstance(v, str) and v:
                return v
        return "precomputed"

    @property
    def template_list(self) -> list[str]:
        return list(PROMPT_TEMPLATES[self.templates] if isinstance(self.templates, str) else self.templates)

    @property
    def uses_category(self) -> bool:
        """Whether prompts depend on the category (then embeddings are cached per category)."""
        return self.kind == "encoder" and any(
            "{category}" in t or t.count("{}") >= 2 for t in self.template_list
        )

    def _lookup(self, name: str) -> Tensor:
        src = self.source
        if _is_text_bank(src):
            for key in (name, clean_text(name), " ".join(name.lower().replace("_", " ").split())):
                if key in src.lookup:
                    return src.vectors[src.lookup[key]]
        else:
            for key in (name, clean_text(name)):
                if key in src:
                    return torch.as_tensor(src[key])
        raise KeyError(f"part name {name!r} has no precomputed text embedding")

    def embed(self, part_names: Sequence[str], category: str | None = None) -> Tensor:
        """``(K, D)`` L2-normalised float32 embeddings of ``part_names`` (in order)."""
        if len(part_names) == 0:
            raise ValueError("part_names is empty: give at least one part name")
        todo = [n for n in dict.fromkeys(part_names) if (n, category) not in self._cache]
        if todo:
            if self.kind == "bank":
                for n in todo:
                    self._cache[(n, category)] = F.normalize(self._lookup(n).float().reshape(-1), dim=0)
            else:
                prompts = [build_prompts(n, category, self.templates) for n in todo]
                flat = [p for ps in prompts for p in ps]
                with torch.no_grad():
                    emb = torch.as_tensor(self.source.encode(flat)).float()
                if emb.dim() != 2 or emb.shape[0] != len(flat):
                    raise ValueError(f"text encoder returned {tuple(emb.shape)} for {len(flat)} prompts")
                emb = F.normalize(emb, dim=-1)
                start = 0
                for n, ps in zip(todo, prompts, strict=True):
                    chunk = emb[start : start + len(ps)]
                    start += len(ps)
                    self._cache[(n, category)] = F.normalize(chunk.mean(0), dim=0)
        out = torch.stack([self._cache[(n, category)] for n in part_names])
        return out.to(self.device) if self.device is not None else out

    def batch(
        self,
        part_names: Sequence[Sequence[str]],
        categories: Sequence[str | None],
        per_category_prompts: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Padded text for a batch: ``(B, K_max, D)`` embeddings and a ``(B, K_max)`` validity mask.

        The category enters the prompts only for templates that use it, so part-only embeddings are
        shared across categories in the cache.
        """
        uses_cat = self.uses_category
        if per_category_prompts is not None:
            uses_cat = per_category_prompts
        embs = [self.embed(n, c if uses_cat else None) for n, c in zip(part_names, categories, strict=True)]
        k_max = max(e.shape[0] for e in embs)
        d = embs[0].shape[1]
        text = embs[0].new_zeros(len(embs), k_max, d)
        mask = torch.zeros(len(embs), k_max, dtype=torch.bool, device=text.device)
        for i, e in enumerate(embs):
            text[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return text, mask


@dataclass
class PointPrediction:
    """Zero-shot output for a batch.

    Attributes:
        labels: ``(B, N)`` local part id per point (``-1`` where below ``none_threshold``).
        point_scores: ``(B, N, K)`` per-point probabilities over the shape's parts (0 on padding).
        patch_logits: ``(B, G, K)`` cosine similarity of each patch with each part (``-inf`` on padding).
    """

    labels: Tensor
    point_scores: Tensor
    patch_logits: Tensor
    encoding: Any = None  # the EncoderOutput the labels came from (set by zero_shot_predict)


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
    logit_scale: float = 1.0 / 0.07,
    none_threshold: float | None = None,
) -> PointPrediction:
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
        logit_scale: multiplies cosines before the softmax that gives ``point_scores`` (and the
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
    return PointPrediction(
        labels=labels,
        point_scores=scores,
        patch_logits=cos.masked_fill(~part_mask[:, None, :], float("-inf")),
    )


def zero_shot_predict(
    encoder: torch.nn.Module,
    batch: Mapping[str, Any],
    embedder: PartTextEmbedder,
    assign: AssignMode = "nearest",
    k: int = 3,
    logit_scale: float = 1.0 / 0.07,
    none_threshold: float | None = None,
) -> PointPrediction:
    """Encode a collated batch (``points``, ``part_names``, ``category``) and label its points.

    Usable as-is in a LightningModule's ``test_step``; the points must already be on the encoder's
    device.
    """
    points = batch["points"]
    out = encoder(points)
    text, mask = embedder.batch(batch["part_names"], batch["category"])
    pred = assign_point_labels(
        out.patch_features,
        text.to(points.device),
        points,
        out.centers,
        out.point_to_patch,
        mask.to(points.device),
        group_index=out.group_index,
        assign=assign,
        k=k,
        logit_scale=logit_scale,
        none_threshold=none_threshold,
    )
    pred.encoding = out
    return pred
