"""Find3D's Objaverse part benchmark reader (``<root>/<split>/<name>_<uid>/`` with ``points5000.pcd``,
``label_map.json``, ``labels.npy``), read as Find3D's ``EvalData3D`` does (ziqi-ma/Find3D
``model/data/data.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from patchalign.io import read_npy, read_pcd_xyz


class ObjaverseFind3D(PartSegDataset):
    """Find3D's Objaverse part benchmark (``seenclass``, ``unseen`` or ``shapenetpart`` split).

    Each shape directory ``<root>/<split>/<class words>_<uid>/`` holds ``points5000.pcd``,
    ``label_map.json`` (``{"1": name, ..., "K": name}``) and ``labels.npy`` (0 = unlabeled, k =
    ``label_map[k]``). The category is the directory name without its last ``_`` field, with ``_``
    read as spaces, as Find3D's ``EvalData3D`` does. Part lists are per shape.
    """

    name = "objaverse"

    def __init__(
        self, root: PathLike, split: str = "unseen", categories: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        split_dir = Path(root) / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"Find3D Objaverse split directory {split_dir} does not exist")
        dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        all_cats = []
        for d in dirs:
            cat = " ".join(d.name.split("_")[:-1]) or d.name
            if cat not in all_cats:
                all_cats.append(cat)
        self.categories = select_categories(categories, all_cats)
        wanted = set(self.categories)
        for d in dirs:
            cat = " ".join(d.name.split("_")[:-1]) or d.name
            if cat not in wanted:
                continue
            if all((d / f).is_file() for f in ("points5000.pcd", "label_map.json", "labels.npy")):
                self._items.append((cat, d.name, d))
                self.part_names_by_category.setdefault(cat, self._read_names(d))
            else:
                self.missing.append(d.name)
        self._report_missing(str(split_dir))

    @staticmethod
    def _read_names(d: Path) -> list[str]:
        label_map = json.loads((d / "label_map.json").read_text())
        try:
            return [label_map[str(i + 1)] for i in range(len(label_map))]
        except KeyError as e:
            raise ValueError(f"{d / 'label_map.json'}: keys must be '1'..'{len(label_map)}'") from e

    def __getitem__(self, index: int) -> PartSegSample:
        cat, uid, d = self._items[index]
        names = self._read_names(d)
        points = read_pcd_xyz(d / "points5000.pcd")
        labels = read_npy(d / "labels.npy").reshape(-1).astype(np.int64) - 1  # 0 (unlabeled) -> -1
        if labels.shape[0] != points.shape[0]:
            raise ValueError(f"{uid}: {points.shape[0]} points but {labels.shape[0]} labels")
        labels = self._check_labels(labels, len(names), uid)
        return PartSegSample(uid=uid, category=cat, points=points, labels=labels, part_names=names)


@register_reader("objaverse")
def _objaverse(
    root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any
) -> PartSegDataset:
    return ObjaverseFind3D(root, split, categories)
