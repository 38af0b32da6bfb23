"""FAUST reader with SATR's per-vertex body-part names (``meshes.txt``, ``scans/<name>.obj``,
``{coarse_gt,fine_grained_gt}.json``), the annotations the released PatchAlign3D data README points
to for "FAUST (coarse parts from SATR)" (dickoah/PatchAlign3D ``src/datasets/README.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchalign.eval.readers.base import PartSegDataset, PartSegSample, PathLike, register_reader
from patchalign.io import read_obj_vertices

# SATR's FAUST label sets (coarse names are the sorted unique names of coarse_gt.json).
FAUST_COARSE_PARTS: list[str] = ["arm", "head", "leg", "torso"]
FAUST_FINE_PARTS: list[str] = [
    "arm",
    "head",
    "torso",
    "leg",
    "belly button",
    "nose",
    "eye",
    "chin",
    "mouth",
    "ear",
    "neck",
    "forehead",
    "shoulder",
    "elbow",
    "hand",
    "knee",
    "foot",
]


class FaustSATR(PartSegDataset):
    """FAUST scans with SATR's per-vertex body-part names.

    Layout: ``<root>/meshes.txt`` (one ``<name>.obj`` per line; optional, default: every key of the
    label file), ``<root>/scans/<name>.obj``, and ``coarse_gt.json`` / ``fine_grained_gt.json``
    mapping each name to a list of part names, one per OBJ vertex. Every shape is category
    ``"human"``. The part vocabulary is SATR's (coarse: arm, head, leg, torso).
    """

    name = "faust"

    def __init__(self, root: PathLike, granularity: Literal["coarse", "fine"] = "coarse") -> None:
        super().__init__()
        self.root = Path(root)
        gt_file = self.root / ("coarse_gt.json" if granularity == "coarse" else "fine_grained_gt.json")
        if not gt_file.is_file():
            raise FileNotFoundError(f"FAUST label file {gt_file} not found")
        self._gt: dict[str, list[str]] = json.loads(gt_file.read_text())
        parts = FAUST_COARSE_PARTS if granularity == "coarse" else FAUST_FINE_PARTS
        unknown = sorted({n for v in self._gt.values() for n in set(v)} - set(parts))
        if unknown:
            raise ValueError(
                f"{gt_file}: part names {unknown} are not in the {granularity} vocabulary {parts}"
            )
        self.categories = ["human"]
        self.part_names_by_category = {"human": list(parts)}
        mesh_list = self.root / "meshes.txt"
        if mesh_list.is_file():
            names = [
                ln.strip().rsplit(".", 1)[0] for ln in mesh_list.read_text().splitlines() if ".obj" in ln
            ]
        else:
            names = sorted(self._gt)
        for n in names:
            obj = self.root / "scans" / f"{n}.obj"
            if obj.is_file() and n in self._gt:
                self._items.append((n, obj))
            else:
                self.missing.append(n)
        self._report_missing(str(mesh_list if mesh_list.is_file() else gt_file))

    def category_of(self, index: int) -> str:
        return "human"

    def uid_of(self, index: int) -> str:
        return self._items[index][0]

    def __getitem__(self, index: int) -> PartSegSample:
        name, obj = self._items[index]
        points = read_obj_vertices(obj)
        names = self._gt[name]
        if len(names) != points.shape[0]:
            raise ValueError(f"{name}: {points.shape[0]} vertices but {len(names)} labels")
        lookup = {n: i for i, n in enumerate(self.part_names_by_category["human"])}
        labels = np.asarray([lookup[n] for n in names], dtype=np.int64)
        return self._sample(name, "human", points, labels)


@register_reader("faust")
def _faust(
    root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any, **kw: Any
) -> PartSegDataset:
    return FaustSATR(root, **kw)  # test only: no split; one category
