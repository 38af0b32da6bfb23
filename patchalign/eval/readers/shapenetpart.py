"""ShapeNetPart readers: the ``..._v0_normal`` txt layout with the official split, and the hdf5 release.

* :class:`ShapeNetPartTxt`: ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` with
  ``<synset>/<id>.txt`` rows ``x y z nx ny nz label`` (global 50-part ids) and the official
  ``train_test_split/shuffled_{train,val,test}_file_list.json`` (the layout the released
  PatchAlign3D ``inference/eval.py --shapenet_root`` reads, dickoah/PatchAlign3D README).
* :class:`ShapeNetPartH5`: ``shapenet_part_seg_hdf5_data`` (``ply_data_<split><i>.h5`` with
  ``data (S, 2048, 3)``, ``label (S, 1)``, ``pid (S, 2048)``) as Find3D's ``EvalShapeNetPart``
  (ziqi-ma/Find3D ``model/data/data.py``) and DGCNN read it.

Vocabularies: the released PatchAlign3D part names and Find3D's ``cat2part``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchalign.eval.readers.base import (
    PartSegDataset,
    PartSegSample,
    PathLike,
    register_reader,
    require_h5py,
    select_categories,
)

# ShapeNetPart metadata: fixed by the benchmark, not read from disk, so a trimmed
# synsetoffset2category.txt (or none) still gives every category its global part-id range.

SHAPENETPART_SYNSETS: dict[str, str] = {
    "Airplane": "02691156",
    "Bag": "02773838",
    "Cap": "02954340",
    "Car": "02958343",
    "Chair": "03001627",
    "Earphone": "03261776",
    "Guitar": "03467517",
    "Knife": "03624134",
    "Lamp": "03636649",
    "Laptop": "03642806",
    "Motorbike": "03790512",
    "Mug": "03797390",
    "Pistol": "03948459",
    "Rocket": "04099429",
    "Skateboard": "04225987",
    "Table": "04379243",
}
SHAPENETPART_NUM_PARTS: dict[str, int] = {
    "Airplane": 4,
    "Bag": 2,
    "Cap": 2,
    "Car": 4,
    "Chair": 4,
    "Earphone": 3,
    "Guitar": 3,
    "Knife": 2,
    "Lamp": 4,
    "Laptop": 2,
    "Motorbike": 6,
    "Mug": 2,
    "Pistol": 3,
    "Rocket": 3,
    "Skateboard": 3,
    "Table": 3,
}
SHAPENETPART_CATEGORIES: list[str] = list(SHAPENETPART_SYNSETS)
_starts = np.cumsum([0] + [SHAPENETPART_NUM_PARTS[c] for c in SHAPENETPART_CATEGORIES])
SHAPENETPART_PART_START: dict[str, int] = {
    c: int(s) for c, s in zip(SHAPENETPART_CATEGORIES, _starts[:-1], strict=True)
}

# Part names used by the released PatchAlign3D evaluation (``PART_NAME_CANDIDATES`` in its
# ``patchalign3d/inference/eval.py``), in global part-id order within each category.
PATCHALIGN3D_SHAPENETPART_PARTS: dict[str, list[str]] = {
    "Airplane": ["body", "wing", "tail", "engine or frame"],
    "Bag": ["handle", "body"],
    "Cap": ["crown", "brim"],
    "Car": ["roof", "hood", "wheel", "body"],
    "Chair": ["back", "seat", "leg", "arm"],
    "Earphone": ["earcup", "headband", "data wire"],
    "Guitar": ["headstock", "neck", "body"],
    "Knife": ["blade", "handle"],
    "Lamp": ["base", "lampshade", "fixing bracket", "pole"],
    "Laptop": ["keyboard", "screen"],
    "Motorbike": ["gas tank", "seat", "wheel", "handles or handlebars", "headlight", "engine or frame"],
    "Mug": ["handle", "cup"],
    "Pistol": ["barrel", "handle or grip", "trigger and guard"],
    "Rocket": ["body", "fin", "nose"],
    "Skateboard": ["wheel", "deck", "belt for foot"],
    "Table": ["desktop", "leg or support", "drawer"],
}
# Find3D's ``EvalShapeNetPart.cat2part`` (model/data/data.py), same order: the released names
# except in the nine categories below.
FIND3D_SHAPENETPART_PARTS: dict[str, list[str]] = {
    **PATCHALIGN3D_SHAPENETPART_PARTS,
    "Cap": ["panels or crown", "visor or peak"],
    "Car": ["roof", "hood", "wheel or tire", "body"],
    "Chair": ["back", "seat pad", "leg", "armrest"],
    "Guitar": ["head or tuners", "neck", "body"],
    "Lamp": ["base", "lampshade", "fixing bracket", "stem"],
    "Laptop": ["keyboard", "screen or monitor"],
    "Motorbike": ["gas tank", "seat", "wheel", "handles or handlebars", "light", "engine or frame"],
    "Pistol": ["barrel", "handle", "trigger and guard"],
    "Rocket": ["body", "fin", "nose cone"],
}
SHAPENETPART_PART_NAME_SETS: dict[str, dict[str, list[str]]] = {
    "patchalign3d": PATCHALIGN3D_SHAPENETPART_PARTS,
    "find3d": FIND3D_SHAPENETPART_PARTS,
}


def resolve_part_names(part_names: str | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if isinstance(part_names, str):
        if part_names not in SHAPENETPART_PART_NAME_SETS:
            raise ValueError(
                f"unknown part-name set {part_names!r}; use one of {list(SHAPENETPART_PART_NAME_SETS)}"
            )
        return {k: list(v) for k, v in SHAPENETPART_PART_NAME_SETS[part_names].items()}
    names = {k: list(v) for k, v in part_names.items()}
    for cat, n in SHAPENETPART_NUM_PARTS.items():
        if cat in names and len(names[cat]) != n:
            raise ValueError(f"part names for {cat} must list {n} parts, got {names[cat]}")
    return names


ShapeNetSplit = Literal["train", "val", "test", "trainval"]


def _read_synset_file(root: Path) -> dict[str, str]:
    """synset -> category name from ``synsetoffset2category.txt`` merged over the built-in table."""
    mapping = {v: k for k, v in SHAPENETPART_SYNSETS.items()}
    f = root / "synsetoffset2category.txt"
    if f.is_file():
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in SHAPENETPART_SYNSETS:
                mapping[parts[1]] = parts[0]
    return mapping


class _ShapeNetPartReader(PartSegDataset):
    """What both ShapeNetPart layouts take and do alike (``root``, ``split``, ``categories``,
    ``part_names``: see :class:`ShapeNetPartTxt`). A layout checks and resolves its root first
    (``_find_root``), then lists the split's shapes (``_index``) once categories and names are set."""

    def __init__(
        self,
        root: PathLike,
        split: ShapeNetSplit = "test",
        categories: Sequence[str] | None = None,
        part_names: str | Mapping[str, Sequence[str]] = "patchalign3d",
    ) -> None:
        super().__init__()
        self.root = self._find_root(Path(root))
        self.categories = select_categories(categories, SHAPENETPART_CATEGORIES)
        names = resolve_part_names(part_names)
        self.part_names_by_category = {c: names[c] for c in self.categories}
        self._index(split)

    def _find_root(self, root: Path) -> Path:
        raise NotImplementedError

    def _index(self, split: ShapeNetSplit) -> None:
        raise NotImplementedError


class ShapeNetPartTxt(_ShapeNetPartReader):
    """ShapeNetPart in the ``..._v0_normal`` txt layout with the official split lists.

    Items follow Point-BERT's ``PartNormalDataset`` order (categories in benchmark order, then ids
    sorted), but unlike that reader the split list, not a directory listing, decides membership, so
    absent shapes are reported rather than silently dropped.

    Args:
        root: the ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` directory.
        split: ``train``, ``val``, ``test`` or ``trainval``.
        categories: restrict to these categories (case-insensitive), default all 16.
        part_names: ``"patchalign3d"`` (released list, default), ``"find3d"``, or a mapping.
    """

    name = "shapenetpart"

    def _find_root(self, root: Path) -> Path:
        if not (root / "train_test_split").is_dir():
            raise FileNotFoundError(f"{root} is not a ShapeNetPart root: no train_test_split/ directory")
        return root

    def _index(self, split: ShapeNetSplit) -> None:
        split_dir = self.root / "train_test_split"
        synset_to_cat = _read_synset_file(self.root)
        wanted = set(self.categories)
        entries: list[str] = []
        for s in ["train", "val"] if split == "trainval" else [split]:
            list_file = split_dir / f"shuffled_{s}_file_list.json"
            if not list_file.is_file():
                raise FileNotFoundError(f"missing split list {list_file}")
            entries += json.loads(list_file.read_text())
        items = []
        for entry in entries:
            parts = entry.strip("/").split("/")
            if len(parts) < 2:
                raise ValueError(f"malformed split entry {entry!r} (expected 'shape_data/<synset>/<id>')")
            synset, shape_id = parts[-2], parts[-1]
            cat = synset_to_cat.get(synset)
            if cat is None:
                raise ValueError(f"split entry {entry!r} has unknown synset {synset}")
            if cat not in wanted:
                continue
            uid = f"{synset}/{shape_id}"
            path = self.root / synset / f"{shape_id}.txt"
            if path.is_file():
                items.append((cat, uid, path))
            else:
                self.missing.append(uid)
        order = {c: i for i, c in enumerate(SHAPENETPART_CATEGORIES)}
        self._items = sorted(items, key=lambda t: (order[t[0]], t[1]))
        self._report_missing(f"the {split} split")

    def __getitem__(self, index: int) -> PartSegSample:
        cat, uid, path = self._items[index]
        # np.fromstring's text mode is a C parser: ~20x faster than np.loadtxt on these files.
        flat = np.fromstring(path.read_text(), dtype=np.float32, sep=" ")
        if flat.size == 0 or flat.size % 7:
            raise ValueError(
                f"{path}: expected rows of 7 numbers (x y z nx ny nz label), got {flat.size} values"
            )
        rows = flat.reshape(-1, 7)
        local = rows[:, 6].astype(np.int64) - SHAPENETPART_PART_START[cat]
        labels = self._check_labels(local, SHAPENETPART_NUM_PARTS[cat], uid)
        return self._sample(uid, cat, np.ascontiguousarray(rows[:, :3]), labels)


class ShapeNetPartH5(_ShapeNetPartReader):
    """ShapeNetPart's 2048-point hdf5 release (``shapenet_part_seg_hdf5_data``).

    Reads every ``ply_data_<split><i>.h5`` under ``root`` (or ``root/hdf5_data``) into memory once
    (the test split is ~70 MB). uids come from the matching ``ply_data_<split>_<i>_id2file.json``
    when present, else ``<file stem>/<row>``. Category ids follow ``all_object_categories.txt``
    when present, else the benchmark's fixed order.
    """

    name = "shapenetpart_h5"

    def _find_root(self, root: Path) -> Path:
        require_h5py()  # a missing h5py is said before any file is looked at
        return root / "hdf5_data" if (root / "hdf5_data").is_dir() else root

    def _index(self, split: ShapeNetSplit) -> None:
        h5py = require_h5py()
        root = self.root
        cat_order = list(SHAPENETPART_CATEGORIES)
        cat_file = root / "all_object_categories.txt"
        if cat_file.is_file():
            cat_order = [ln.split()[0] for ln in cat_file.read_text().splitlines() if ln.strip()]
        splits = ["train", "val"] if split == "trainval" else [split]
        files = []
        for s in splits:
            found = [
                p for p in root.glob(f"ply_data_{s}*.h5") if re.fullmatch(rf"ply_data_{s}\d+\.h5", p.name)
            ]
            files += sorted(found, key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
        if not files:
            raise FileNotFoundError(f"no ply_data_{split}<i>.h5 files under {root}")
        points, labels, cats, uids = [], [], [], []
        for f in files:
            with h5py.File(f, "r") as h:
                data = np.asarray(h["data"], dtype=np.float32)
                lab = np.asarray(h["label"]).reshape(-1).astype(np.int64)
                pid = np.asarray(h["pid"]).astype(np.int64)
            idx = re.findall(r"\d+", f.stem)[-1]
            id_file = f.with_name(f"{f.stem[: -len(idx)]}_{idx}_id2file.json")
            names_f = json.loads(id_file.read_text()) if id_file.is_file() else None
            for row in range(data.shape[0]):
                cat = cat_order[lab[row]]
                if cat not in self.part_names_by_category:
                    continue
                uid = os.path.splitext(names_f[row])[0] if names_f else f"{f.stem}/{row}"
                points.append(data[row])
                labels.append(
                    self._check_labels(
                        pid[row] - SHAPENETPART_PART_START[cat], SHAPENETPART_NUM_PARTS[cat], uid
                    )
                )
                cats.append(cat)
                uids.append(uid)
        self._items = list(range(len(points)))
        self._points, self._labels, self._cats, self._uids = points, labels, cats, uids

    def category_of(self, index: int) -> str:
        return self._cats[index]

    def uid_of(self, index: int) -> str:
        return self._uids[index]

    def __getitem__(self, index: int) -> PartSegSample:
        cat = self._cats[index]
        return self._sample(self._uids[index], cat, self._points[index], self._labels[index])


@register_reader("shapenetpart")
def _txt(root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any) -> PartSegDataset:
    return ShapeNetPartTxt(root, split, categories, part_names)  # type: ignore[arg-type]


@register_reader("shapenetpart_h5")
def _h5(root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any) -> PartSegDataset:
    return ShapeNetPartH5(root, split, categories, part_names)  # type: ignore[arg-type]
