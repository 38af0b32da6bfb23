"""Reader interface shared by every benchmark, and the registry :func:`build_dataset` reads.

Every reader is a map-style ``torch.utils.data.Dataset`` whose items are :class:`PartSegSample`
dicts::

    {"uid": str, "category": str, "points": (N, 3) float32, "labels": (N,) int64, "part_names": [str]}

``labels`` are *local* part ids: ``labels[i] = k`` means point ``i`` belongs to ``part_names[k]``;
``-1`` marks points that belong to none of the evaluated parts (PartNetE's "not a part", Find3D's
"unlabeled"). Readers return full-resolution shapes in their file's coordinates; the evaluation
protocol's normalisation and seeded subsampling live in :mod:`patchalign.eval.protocol`.

A split list that names shapes that are not on disk (common: partial downloads, the trimmed copies
used in CI) is not an error: the reader counts them, logs one warning, and exposes them as
``dataset.missing``. Malformed files (wrong column count, labels outside the category) raise.

Registry: each benchmark module registers a factory under its kind with :func:`register_reader`;
:func:`build_dataset` looks the kind up instead of an if-chain, so a new benchmark is one module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class PartSegSample(TypedDict):
    """One shape with per-point part labels (see the module docstring for the conventions)."""

    uid: str
    category: str
    points: np.ndarray
    labels: np.ndarray
    part_names: list[str]


class PartSegDataset(Dataset):
    """Common interface of the benchmark readers.

    Attributes:
        name: benchmark name (for reports).
        categories: every category this reader can yield, in report order (including categories with
            no shape on disk, so per-category tables and metric states have a fixed size).
        part_names_by_category: the category's part vocabulary (local id order). Readers whose part
            list varies per shape (Objaverse) list each category's first shape's names; samples always
            carry their own ``part_names``.
        missing: uids the split names but that are absent on disk (counted and logged, not fatal).
    """

    name: str = "partseg"

    def __init__(self) -> None:
        self.categories: list[str] = []
        self.part_names_by_category: dict[str, list[str]] = {}
        self.missing: list[str] = []
        self._items: list[Any] = []

    @property
    def num_missing(self) -> int:
        return len(self.missing)

    def __len__(self) -> int:
        return len(self._items)

    # Default item layout: ``_items`` holds ``(category, uid, ...)`` tuples; readers that store
    # something else (FAUST, the h5 readers) override these two.
    def category_of(self, index: int) -> str:
        """Category of item ``index`` without reading its file."""
        return self._items[index][0]

    def uid_of(self, index: int) -> str:
        return self._items[index][1]

    def _report_missing(self, what: str) -> None:
        if self.missing:
            log.warning(
                "%s: %d of %d shapes listed in %s are absent on disk and skipped (first: %s)",
                self.name,
                len(self.missing),
                len(self.missing) + len(self._items),
                what,
                ", ".join(self.missing[:3]),
            )

    def _sample(self, uid: str, category: str, points: np.ndarray, labels: np.ndarray) -> PartSegSample:
        """One sample named with its category's vocabulary (a fresh list: callers may edit theirs)."""
        return PartSegSample(
            uid=uid,
            category=category,
            points=points,
            labels=labels,
            part_names=list(self.part_names_by_category[category]),
        )

    @staticmethod
    def _check_labels(labels: np.ndarray, num_parts: int, uid: str) -> np.ndarray:
        labels = labels.astype(np.int64, copy=False)
        if labels.size and (labels.min() < -1 or labels.max() >= num_parts):
            raise ValueError(
                f"{uid}: part labels span [{labels.min()}, {labels.max()}], expected -1..{num_parts - 1}"
            )
        return labels


def select_categories(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Case-insensitive category filter; unknown names are an error listing the valid ones."""
    if requested is None:
        return list(available)
    by_lower = {c.lower(): c for c in available}
    out = []
    for c in requested:
        if c.lower() not in by_lower:
            raise ValueError(f"unknown category {c!r}; available: {', '.join(available)}")
        out.append(by_lower[c.lower()])
    return out


ReaderFactory = Callable[..., PartSegDataset]
READERS: dict[str, ReaderFactory] = {}
"""kind -> factory ``(root, split, categories, part_names, **kwargs) -> PartSegDataset``."""


def register_reader(kind: str) -> Callable[[ReaderFactory], ReaderFactory]:
    """Register ``factory`` under ``kind`` (a second registration of one kind is an error)."""

    def deco(factory: ReaderFactory) -> ReaderFactory:
        if kind in READERS:
            raise ValueError(f"reader kind {kind!r} registered twice")
        READERS[kind] = factory
        return factory

    return deco


def build_dataset(
    kind: str,
    root: PathLike,
    split: str = "test",
    categories: Sequence[str] | None = None,
    part_names: str | Mapping[str, Sequence[str]] = "patchalign3d",
    **kwargs: Any,
) -> PartSegDataset:
    """Construct a reader by kind (the datamodule's and the CLI's entry point).

    ``part_names`` applies to ShapeNetPart only; the other benchmarks fix their vocabulary.
    ``split`` is ignored by FAUST (test only); for Objaverse it is ``seenclass|unseen|shapenetpart``.
    ``kwargs`` go to the reader (FAUST ``granularity``, PartNetE ``meta_path``, ScanObjectNN h5
    ``variant``/``suffix``).
    """
    if kind not in READERS:
        raise ValueError(f"unknown dataset kind {kind!r}; registered: {', '.join(sorted(READERS))}")
    return READERS[kind](root, split, categories, part_names, **kwargs)


def require_h5py() -> Any:
    """The optional ``h5py`` module, or an ImportError saying how to install it."""
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .h5 benchmark files needs h5py: pip install h5py") from e
    return h5py
