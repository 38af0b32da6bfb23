"""PartNetE (PartNet-Ensembled, PartSLIP) reader: ``<root>/<split>/<Category>/<id>/{pc.ply,label.npy}``
with ``PartNetE_meta.json``, the layout Find3D's ``EvalPartNetE`` reads (ziqi-ma/Find3D
``model/data/data.py``, ``model/evaluation/benchmark/README.md``; data from Colin97/PartSLIP).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchalign.eval.readers.base import (
    PartSegDataset,
    PartSegSample,
    PathLike,
    register_reader,
    select_categories,
)
from patchalign.io import read_npy, read_ply_xyz


class PartNetE(PartSegDataset):
    """PartNet-Ensembled (PartSLIP) test data.

    Layout: ``<root>/<split>/<Category>/<id>/pc.ply`` (coloured point cloud) and ``label.npy``
    (``np.save`` of a dict; ``semantic_seg`` is 0-indexed into ``PartNetE_meta.json[Category]``,
    ``-1`` = not a part). ``<root>`` may also be the ``data/`` directory of the PartSLIP download.
    An ``<id>`` directory without both files is counted as missing.

    ``label.npy`` is a pickle, so it is read by :func:`patchalign.io.read_npy` with its restricted
    unpickler (numpy arrays, dtypes, scalars and plain containers only), never ``allow_pickle=True``:
    a file naming anything else raises :class:`patchalign.io.UnsafePickleError` with its path, and
    the evaluation stops there rather than skipping the shape.

    Args:
        meta_path: ``PartNetE_meta.json``; default ``<root>/PartNetE_meta.json`` then its parent's.
    """

    name = "partnete"

    def __init__(
        self,
        root: PathLike,
        split: str = "test",
        categories: Sequence[str] | None = None,
        meta_path: PathLike | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        candidates = (
            [Path(meta_path)]
            if meta_path
            else [self.root / "PartNetE_meta.json", self.root.parent / "PartNetE_meta.json"]
        )
        meta_file = next((p for p in candidates if p.is_file()), None)
        if meta_file is None:
            raise FileNotFoundError(
                f"PartNetE_meta.json not found (looked in {[str(p) for p in candidates]})"
            )
        meta: dict[str, list[str]] = json.loads(meta_file.read_text())
        split_dir = self.root / split
        if not split_dir.is_dir() and (self.root / "data" / split).is_dir():
            split_dir = self.root / "data" / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"PartNetE split directory {split_dir} does not exist")
        self.categories = select_categories(categories, sorted(meta))
        self.part_names_by_category = {c: list(meta[c]) for c in self.categories}
        for cat in self.categories:
            cat_dir = split_dir / cat
            if not cat_dir.is_dir():
                continue
            ids = sorted((p for p in cat_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
            for d in ids:
                uid = f"{cat}/{d.name}"
                if (d / "pc.ply").is_file() and (d / "label.npy").is_file():
                    self._items.append((cat, uid, d))
                else:
                    self.missing.append(uid)
        self._report_missing(f"{split_dir}")

    def __getitem__(self, index: int) -> PartSegSample:
        cat, uid, d = self._items[index]
        points = read_ply_xyz(d / "pc.ply")
        label_file = d / "label.npy"
        raw = read_npy(label_file, allow_objects=True)  # restricted unpickler; refusals name the file
        lab = raw.item() if raw.dtype == object and raw.shape == () else raw
        if not isinstance(lab, Mapping) or "semantic_seg" not in lab:
            raise ValueError(f"{label_file}: expected a dict with 'semantic_seg' (PartSLIP's label.npy)")
        labels = np.asarray(lab["semantic_seg"]).reshape(-1)
        numeric = np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
        if not numeric or (labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))):
            raise ValueError(
                f"{label_file}: 'semantic_seg' must hold whole-number labels, got {labels.dtype}"
            )
        if labels.shape[0] != points.shape[0]:
            raise ValueError(f"{uid}: {points.shape[0]} points but {labels.shape[0]} labels")
        labels = self._check_labels(labels, len(self.part_names_by_category[cat]), uid)
        return self._sample(uid, cat, points, labels)


@register_reader("partnete")
def _partnete(
    root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any, **kw: Any
) -> PartSegDataset:
    return PartNetE(root, split, categories, **kw)
