"""The zero-shot part-segmentation protocol: part names -> text embeddings -> patch scores -> point labels.

Steps (defaults reproduce the released PatchAlign3D evaluation):

1. **Names and prompts.** Each part name is expanded with prompt templates, every prompt is encoded
   and L2-normalised, the prompts of a name are averaged and re-normalised
   (:class:`PartTextEmbedder`). Presets: ``part_only`` (released default: ``"{part}"``, ``"a {part}"``,
   ``"{part} part"``), ``part_plus_cat``, ``ensemble`` (both, released ``--text_setting``), ``find3d``
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

The prompt templates, the name cleaner and the prompt-ensembling live in :mod:`patchalign.text`, and
the patch -> point label transfer in :mod:`patchalign.pretrained` (inference must not import this
evaluation package); they are re-exported here. Reproduces the released ``inference/eval.py``
(dickoah/PatchAlign3D, arXiv 2601.02457).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from patchalign.pretrained import AssignMode, PointPrediction, assign_point_labels
from patchalign.text import PROMPT_TEMPLATES, PartTextEmbedder, build_prompts, clean_part_name

log = logging.getLogger(__name__)

TextSource = Any  # a text encoder (``.encode``), a ``{name: vector}`` mapping or a TextBank
clean_text = clean_part_name  # the released ``_clean_text``; one cleaner for training and evaluation

__all__ = [
    "PROMPT_TEMPLATES",
    "AssignMode",
    "PartTextEmbedder",
    "PointPrediction",
    "TextSource",
    "assign_point_labels",
    "build_prompts",
    "clean_text",
    "zero_shot_predict",
]


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
