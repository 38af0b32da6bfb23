"""Namers: which keypoints to look for on a shape.

ZeroKey (arXiv:2412.06292) asks GPT-4o "List possible salient key points (in text)." with
rendered views of the shape and gets 6-10 names per shape: :class:`OpenAINamer`'s defaults. For
benchmarks the names can instead come from the config (:class:`StaticNamer`) or from KeypointNet's
per-category semantic names (:class:`KeypointNetNamer`) -- with the OraclePointer that evaluates the
3D half of the method only, not ZeroKey. Every namer returns unique names plus how many *instances* of
each to expect (a repeated name, e.g. four "end of the chair leg"), which the clustering step uses to
keep that many clusters; the paper's names are unique, one keypoint each.

A namer that cannot answer (request failed, no names in the answer) does not return an empty list
that would read as "0 keypoints found": ``NamingResult.error`` says why and the shape is recorded as
failed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from zerokey.data import ShapeSample, load_semantic_names
from zerokey.mllm.client import BudgetExceeded, CallBudget, ChatClient, ChatError, MLLMRole
from zerokey.mllm.parsing import ParseStats, parse_name_list
from zerokey.original import original_label_table

__all__ = [
    "NamingResult",
    "Namer",
    "StaticNamer",
    "KeypointNetNamer",
    "OriginalLabelNamer",
    "OpenAINamer",
    "unique_with_counts",
]

log = logging.getLogger(__name__)


@dataclass
class NamingResult:
    """Unique keypoint names, expected instances per name, and how the answer parsed."""

    names: list[str]
    instances: list[int]
    stats: ParseStats = field(default_factory=ParseStats)
    calls: int = 0
    error: str | None = None  # why no names could be had (the shape is then failed, not "0 found")
    #: namer-specific facts for the record (``naming_details``), e.g. the point a DescribeNamer marked.
    details: dict = field(default_factory=dict)


def unique_with_counts(names: Sequence[str | None]) -> tuple[list[str], list[int]]:
    """Unique non-empty names in first-seen order, with how often each occurred."""
    counts = Counter(n for n in names if n)
    unique = list(dict.fromkeys(n for n in names if n))
    return unique, [counts[n] for n in unique]


class Namer(MLLMRole, ABC):
    """Interface: ``namer(shape, images) -> NamingResult``; ``images`` are the rendered views
    (V,H,W,3) in [0,1]. ``check`` / ``attach_budget`` / ``settings`` / ``is_ground_truth`` as for
    :class:`zerokey.mllm.pointers.Pointer`."""

    #: True when the names come from the benchmark's annotation (the run then says it evaluates the
    #: 3D half of the method, not zero-shot naming).
    is_ground_truth: bool = False
    #: what the run's output calls this naming protocol when it is not zero-shot (None: nothing to say).
    protocol: str | None = None

    @abstractmethod
    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult: ...

    def name_views(self, shape: ShapeSample, views: Any) -> NamingResult:
        """What the pipeline calls: the namer on the rendered views (``views.images``); namers that need
        the cameras too (:class:`zerokey.describe.DescribeNamer`) override this."""
        return self(shape, views.images)


class StaticNamer(Namer):
    """Names from the config: a list for every shape, or a {category: list} mapping.

    Repeated names mean several instances. Shapes that carry their own ``names`` (from the dataset)
    use those instead.
    """

    def __init__(self, names: list[str] | dict[str, list[str]]) -> None:
        self.names = names

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        if shape.names:
            chosen = shape.names
        elif isinstance(self.names, dict):
            if shape.category not in self.names:
                raise KeyError(
                    f"StaticNamer has no names for category {shape.category!r} (shape {shape.shape_id})"
                )
            chosen = self.names[shape.category]
        else:
            chosen = self.names
        unique, counts = unique_with_counts(chosen)
        return NamingResult(unique, counts)


class KeypointNetNamer(Namer):
    """KeypointNet's semantic names for the shape's category (all semantic ids of the category, not
    just those annotated on this shape: the detector must not see the ground truth).

    Several semantic ids share one name ("lower end of the front leg of the chair" x4); the count
    becomes the number of instances to find.
    """

    is_ground_truth = True

    def __init__(self, semantic_names: str) -> None:
        path = Path(semantic_names)
        if not path.is_file():
            raise FileNotFoundError(
                f"KeypointNetNamer: semantic names file {path} not found (set semantic_names to "
                "<keypointnet root>/semantic_names.json)"
            )
        self.semantic_names = str(path)
        self.table = load_semantic_names(path)

    def settings(self) -> dict[str, Any]:
        return {"class": "zerokey.mllm.namers.KeypointNetNamer", "table": self.table}

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        if shape.category not in self.table:
            raise KeyError(
                f"no KeypointNet semantic names for category {shape.category!r} (shape {shape.shape_id})"
            )
        ids = sorted(self.table[shape.category])
        unique, counts = unique_with_counts([self.table[shape.category][i] for i in ids])
        return NamingResult(unique, counts)


class OriginalLabelNamer(Namer):
    """The authors' KeypointNet protocol (Wenri/Zero-Shot-3DKP @116cbed583cfb686389ee5e0f08d1f9dc744bb34,
    ``kpeval.py`` 44-56 and ``kpviews.py`` 195-229; the GPT-4o naming call is commented out there): the
    names are the labels of the semantic ids **annotated on this shape**, from ZeroKey's own label table
    (:func:`zerokey.original.original_label_table`: ``semantic_names.json`` with airplane ids 3 / 5
    renamed), and identical strings are one query ("lower end of the front leg of the chair" for ids
    10, 12, 17, 20). Ground-truth names: the run says "original protocol (ground-truth names)".

    ``instances`` is the number of ids behind a name (the original clustering keeps every cluster above
    its weight rule regardless).
    """

    is_ground_truth = True
    protocol = "original protocol (ground-truth names)"

    def __init__(self, semantic_names: str) -> None:
        path = Path(semantic_names)
        if not path.is_file():
            raise FileNotFoundError(
                f"OriginalLabelNamer: semantic names file {path} not found (set semantic_names to "
                "<keypointnet root>/semantic_names.json)"
            )
        self.semantic_names = str(path)
        self.table = original_label_table(path)

    def settings(self) -> dict[str, Any]:
        return {"class": "zerokey.mllm.namers.OriginalLabelNamer", "table": self.table}

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        ids = shape.extra.get("semantic_ids")
        if ids is None:
            raise ValueError(
                f"OriginalLabelNamer names the semantic ids annotated on a shape; {shape.shape_id} has none "
                "(KeypointNet data only)"
            )
        labels = self.table.get(shape.category or "")
        if labels is None:
            raise KeyError(f"no label table for category {shape.category!r} (shape {shape.shape_id})")
        unknown = sorted({i for i in ids if i not in labels})
        if unknown:
            raise KeyError(
                f"semantic ids {unknown} of {shape.shape_id} are not in the {shape.category} table"
            )
        unique, counts = unique_with_counts([labels[i] for i in sorted(set(ids))])
        return NamingResult(unique, counts)


#: The paper's namer prompt (arXiv:2412.06292), sent with the rendered views.
DEFAULT_NAMER_PROMPT = "List possible salient key points (in text)."

#: Our earlier prompt, kept as an option (``prompt: ...``): JSON, sides, repeats per instance.
JSON_NAMER_PROMPT = (
    "The images are {n_views} renderings of the same 3D {category} from different viewpoints. "
    "List the semantically meaningful keypoints of this object that a 3D artist would annotate "
    "(e.g. tips, corners, ends of parts). Use short, unambiguous names that say which part and which side "
    "(left/right/front/back) where that matters. If a keypoint occurs several times (e.g. four leg ends), "
    "repeat its name once per occurrence. Answer with a JSON list of strings only, at most {max_names} names."
)


class OpenAINamer(Namer):
    """Ask an OpenAI-compatible multimodal LLM (GPT-4o in the paper) for keypoint names, one request
    per shape.

    Args:
        base_url / model / api_key_env / timeout / max_retries / max_tokens: see :class:`ChatClient`.
        n_views: how many rendered views to send, spread evenly over the rendered layout (default 6).
        view_indices: exactly which views to send (overrides ``n_views``).
        prompt: the paper's "List possible salient key points (in text)." by default; may use
            ``{n_views}``, ``{category}``, ``{max_names}`` (e.g. :data:`JSON_NAMER_PROMPT`).
        max_names: cap on the names kept, in answer order (10: the paper reports 6-10 per shape).
        fallback_names: used when the request fails or the answer has no names (the failure is still
            counted in ``parse_stats``); None (default) records the shape as failed instead.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        n_views: int = 6,
        view_indices: list[int] | None = None,
        prompt: str = DEFAULT_NAMER_PROMPT,
        max_names: int = 10,
        timeout: float = 120.0,
        max_retries: int = 2,
        max_tokens: int = 512,
        fallback_names: list[str] | None = None,
    ) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries, max_tokens=max_tokens)
        self.n_views = n_views
        self.view_indices = view_indices
        self.prompt = prompt
        self.max_names = max_names
        self.fallback_names = fallback_names

    def check(self) -> None:
        self.client.ping()

    def attach_budget(self, budget: CallBudget) -> None:
        self.client.budget = budget

    def select_views(self, n_views: int) -> list[int]:
        if self.view_indices is not None:
            bad = [i for i in self.view_indices if not 0 <= i < n_views]
            if bad:
                raise ValueError(f"view_indices {bad} out of range for {n_views} views")
            return list(self.view_indices)
        count = min(self.n_views, n_views)
        return [round(i * n_views / count) % n_views for i in range(count)]

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        views = self.select_views(images.shape[0])
        prompt = self.prompt.format(
            n_views=len(views), category=shape.category or "object", max_names=self.max_names
        )
        calls_before = self.client.calls
        error = None
        try:
            answer = self.client.complete(prompt, [images[i] for i in views])
        except ChatError as err:
            if isinstance(err, BudgetExceeded):
                stats = ParseStats(unsent=1)
            else:
                log.warning("namer request failed for %s: %s", shape.shape_id, err)
                stats = ParseStats(failed_calls=1)
            names: list[str] = []
            error = f"namer request failed: {err}"
        else:
            names, stats = parse_name_list(answer, self.max_names)
            if not names:
                error = f"namer answer has no names: {answer[:120]!r}"
        if not names and self.fallback_names:
            log.warning("%s for %s; using fallback_names", error, shape.shape_id)
            names, error = list(self.fallback_names), None
        unique, counts = unique_with_counts(names)
        return NamingResult(unique, counts, stats, calls=self.client.calls - calls_before, error=error)
