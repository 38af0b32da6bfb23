"""Namers: which keypoints to look for on a shape.

ZeroKey asks a multimodal LLM to name a shape's salient keypoints from its rendered views; for
benchmarks the names can instead come from the config or from KeypointNet's per-category semantic
names. Every namer returns unique names plus how many *instances* of each to expect (four "end of the
chair leg"), which the clustering step uses to keep that many clusters.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from zerokey.data import ShapeSample, default_data_root, load_semantic_names
from zerokey.openai_client import ChatClient, ChatError
from zerokey.parsing import ParseStats, parse_name_list

__all__ = ["NamingResult", "Namer", "StaticNamer", "KeypointNetNamer", "OpenAINamer", "unique_with_counts"]

log = logging.getLogger(__name__)


@dataclass
class NamingResult:
    """Unique keypoint names, expected instances per name, and how the answer parsed."""

    names: list[str]
    instances: list[int]
    stats: ParseStats = field(default_factory=ParseStats)
    calls: int = 0


def unique_with_counts(names: Sequence[str | None]) -> tuple[list[str], list[int]]:
    """Unique non-empty names in first-seen order, with how often each occurred."""
    counts = Counter(n for n in names if n)
    unique = list(dict.fromkeys(n for n in names if n))
    return unique, [counts[n] for n in unique]


class Namer(ABC):
    """Interface: ``namer(shape, images) -> NamingResult``; ``images`` are the rendered views
    (V,H,W,3) in [0,1]."""

    @abstractmethod
    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult: ...


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

    def __init__(self, semantic_names: str | None = None) -> None:
        path = (
            Path(semantic_names)
            if semantic_names
            else default_data_root() / "keypointnet" / "semantic_names.json"
        )
        if not path.exists():
            raise FileNotFoundError(f"semantic names file {path} not found")
        self.table = load_semantic_names(path)

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        if shape.category not in self.table:
            raise KeyError(
                f"no KeypointNet semantic names for category {shape.category!r} (shape {shape.shape_id})"
            )
        ids = sorted(self.table[shape.category])
        unique, counts = unique_with_counts([self.table[shape.category][i] for i in ids])
        return NamingResult(unique, counts)


DEFAULT_NAMER_PROMPT = (
    "The images are {n_views} renderings of the same 3D {category} from different viewpoints. "
    "List the semantically meaningful keypoints of this object that a 3D artist would annotate "
    "(e.g. tips, corners, ends of parts). Use short, unambiguous names that say which part and which side "
    "(left/right/front/back) where that matters. If a keypoint occurs several times (e.g. four leg ends), "
    "repeat its name once per occurrence. Answer with a JSON list of strings only, at most {max_names} names."
)


class OpenAINamer(Namer):
    """Ask an OpenAI-compatible multimodal LLM for keypoint names (one request per shape).

    Args:
        base_url / model / api_key_env / timeout / max_retries / max_tokens: see :class:`ChatClient`.
        view_indices: which rendered views to send (default: 4 spread over the ring). Sending all 26
            views costs a lot of tokens and adds little for naming.
        prompt: template with ``{n_views}``, ``{category}``, ``{max_names}``.
        max_names: cap on returned names (before de-duplication into instances).
        fallback_names: used (and counted as a failed call) when the request fails or the answer has
            no names; None leaves the shape without keypoints.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        view_indices: list[int] | None = None,
        prompt: str = DEFAULT_NAMER_PROMPT,
        max_names: int = 20,
        timeout: float = 120.0,
        max_retries: int = 2,
        max_tokens: int = 512,
        fallback_names: list[str] | None = None,
    ) -> None:
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries, max_tokens=max_tokens)
        self.view_indices = view_indices
        self.prompt = prompt
        self.max_names = max_names
        self.fallback_names = fallback_names

    def select_views(self, n_views: int) -> list[int]:
        if self.view_indices is not None:
            bad = [i for i in self.view_indices if not 0 <= i < n_views]
            if bad:
                raise ValueError(f"view_indices {bad} out of range for {n_views} views")
            return list(self.view_indices)
        count = min(4, n_views)
        return [round(i * n_views / count) % n_views for i in range(count)]

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        views = self.select_views(images.shape[0])
        prompt = self.prompt.format(
            n_views=len(views), category=shape.category or "object", max_names=self.max_names
        )
        calls_before = self.client.calls
        try:
            answer = self.client.complete(prompt, [images[i] for i in views])
        except ChatError as err:
            log.warning("namer request failed for %s: %s", shape.shape_id, err)
            stats = ParseStats(failed_calls=1)
            names: list[str] = list(self.fallback_names or [])
        else:
            names, stats = parse_name_list(answer, self.max_names)
            if not names:
                log.warning("namer gave no usable names for %s: %r", shape.shape_id, answer[:200])
                names = list(self.fallback_names or [])
        unique, counts = unique_with_counts(names)
        return NamingResult(unique, counts, stats, calls=self.client.calls - calls_before)
