"""Readers for the zero-shot part-segmentation benchmarks, each in its published on-disk layout.

Every reader is a map-style ``torch.utils.data.Dataset`` whose items are :class:`PartSegSample`
dicts::

    {"uid": str, "category": str, "points": (N, 3) float32, "labels": (N,) int64, "part_names": [str]}

``labels`` are *local* part ids: ``labels[i] = k`` means point ``i`` belongs to ``part_names[k]``;
``-1`` marks points that belong to none of the evaluated parts (PartNetE's "not a part", Find3D's
"unlabeled"). Readers return full-resolution shapes in their file's coordinates; the evaluation
protocol's normalisation and seeded subsampling live in :class:`ResampledDataset` so that every
benchmark goes through the same code.

A split list that names shapes that are not on disk (common: partial downloads, the trimmed copies
used in CI) is not an error: the reader counts them, logs one warning, and exposes them as
``dataset.missing``. Malformed files (wrong column count, labels outside the category) raise.

Layouts (all checked against the reference readers):

* :class:`ShapeNetPartTxt`: ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` with
  ``<synset>/<id>.txt`` rows ``x y z nx ny nz label`` (global 50-part ids) and the official
  ``train_test_split/shuffled_{train,val,test}_file_list.json``.
* :class:`ShapeNetPartH5`: ``shapenet_part_seg_hdf5_data`` (``ply_data_<split><i>.h5`` with
  ``data (S, 2048, 3)``, ``label (S, 1)``, ``pid (S, 2048)``) as read by Find3D and DGCNN.
* :class:`PartNetE`: PartSLIP's ``<root>/<split>/<Category>/<id>/{pc.ply,label.npy}`` with
  ``PartNetE_meta.json``; ``label.npy`` holds a pickled dict with ``semantic_seg`` (``-1`` = none).
* :class:`FaustSATR`: SATR's FAUST annotations, ``meshes.txt``, ``scans/<name>.obj`` and
  ``{coarse_gt,fine_grained_gt}.json`` (one part *name* per vertex).
* :class:`ScanObjectNNParts`: ScanObjectNN's part release ``object_dataset_complete_with_parts_``
  (``split_new.txt``, ``<category>/<file>.bin`` + ``<file>_part.bin``), with COPS's part names.
* :class:`ScanObjectNNH5`: ScanObjectNN's ``h5_files`` (``data``, ``label``, ``mask``): the only
  per-point annotation there is object vs background, so it evaluates that two-part split.
* :class:`ObjaverseFind3D`: Find3D's Objaverse benchmark ``<root>/<split>/<name>_<uid>/`` with
  ``points5000.pcd``, ``label_map.json`` (``{"1": part, ...}``) and ``labels.npy`` (``0`` = unlabeled).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch
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


# --------------------------------------------------------------------------------------------------
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
# Find3D's ``EvalShapeNetPart.cat2part`` (model/data/data.py), same order.
FIND3D_SHAPENETPART_PARTS: dict[str, list[str]] = {
    "Airplane": ["body", "wing", "tail", "engine or frame"],
    "Bag": ["handle", "body"],
    "Cap": ["panels or crown", "visor or peak"],
    "Car": ["roof", "hood", "wheel or tire", "body"],
    "Chair": ["back", "seat pad", "leg", "armrest"],
    "Earphone": ["earcup", "headband", "data wire"],
    "Guitar": ["head or tuners", "neck", "body"],
    "Knife": ["blade", "handle"],
    "Lamp": ["base", "lampshade", "fixing bracket", "stem"],
    "Laptop": ["keyboard", "screen or monitor"],
    "Motorbike": ["gas tank", "seat", "wheel", "handles or handlebars", "light", "engine or frame"],
    "Mug": ["handle", "cup"],
    "Pistol": ["barrel", "handle", "trigger and guard"],
    "Rocket": ["body", "fin", "nose cone"],
    "Skateboard": ["wheel", "deck", "belt for foot"],
    "Table": ["desktop", "leg or support", "drawer"],
}
SHAPENETPART_PART_NAME_SETS: dict[str, dict[str, list[str]]] = {
    "patchalign3d": PATCHALIGN3D_SHAPENETPART_PARTS,
    "find3d": FIND3D_SHAPENETPART_PARTS,
}

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

# ScanObjectNN: category ids of the release, and COPS's part names
# (source/prompts/ScanObjectNN-Part_part_names.json) indexed by the remapped part id.
SCANOBJECTNN_CATEGORIES: list[str] = [
    "bag",
    "bin",
    "box",
    "cabinet",
    "chair",
    "desk",
    "display",
    "door",
    "shelf",
    "table",
    "bed",
    "pillow",
    "sink",
    "sofa",
    "toilet",
]
SCANOBJECTNN_PARTS: dict[str, list[str]] = {
    "bag": ["background", "bag body", "handle", "shoulder strap"],
    "bin": ["background", "container", "outside frame", "cover"],
    "box": ["background", "container", "containing things", "bottom", "cover"],
    "cabinet": ["background", "countertop", "shelf", "frame", "drawer", "base", "door"],
    "chair": ["background", "back", "arm", "base", "seat"],
    "desk": ["background", "desktop", "base", "drawer"],
    "display": ["background", "screen", "base"],
    "door": ["background", "outside frame", "door"],
    "shelf": ["background", "frame", "surface", "thing"],
    "table": ["background", "tabletop", "base"],
    "bed": ["background", "sleep area", "frame"],
    "pillow": ["background", "pillow"],
    "sink": ["background", "bowl", "faucet", "drain"],
    "sofa": ["background", "back", "arm", "base", "seat"],
    "toilet": ["background", "tank", "bowl", "cover", "seat", "base"],
}
# Raw part id -> remapped id per category (-1: a raw id with no evaluated part), as in COPS.
SCANOBJECTNN_PART_REMAP: dict[str, list[int]] = {
    "bin": [0, 1, 2, -1, 3],
    "chair": [0, -1, 1, 2, 3, 4],
}


# --------------------------------------------------------------------------------------------------
# Small file-format readers (no open3d / plyfile dependency).


def read_pcd_xyz(path: PathLike) -> np.ndarray:
    """``x y z`` of a PCD file (``DATA ascii`` or ``binary``; as written by Open3D and PCL).

    ``binary_compressed`` (LZF) is rejected with a clear error: re-save the file uncompressed.
    """
    path = Path(path)
    with open(path, "rb") as f:
        header: dict[str, list[str]] = {}
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: PCD header ended before a DATA line")
            text = line.decode("ascii", errors="replace").strip()
            if not text or text.startswith("#"):
                continue
            key, *vals = text.split()
            header[key.upper()] = vals
            if key.upper() == "DATA":
                break
        body = f.read()
    fields = header.get("FIELDS", [])
    if not {"x", "y", "z"} <= set(fields):
        raise ValueError(f"{path}: PCD has no x/y/z fields (FIELDS {fields})")
    n = int(header.get("POINTS", header.get("WIDTH", ["0"]))[0])
    sizes = [int(s) for s in header.get("SIZE", ["4"] * len(fields))]
    types = header.get("TYPE", ["F"] * len(fields))
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    mode = header["DATA"][0].lower()
    cols = [fields.index(a) for a in ("x", "y", "z")]
    if mode == "ascii":
        arr = np.array(body.split(), dtype=np.float64).reshape(n, sum(counts))
        offsets = np.cumsum([0] + counts)
        return arr[:, [offsets[c] for c in cols]].astype(np.float32)
    if mode == "binary":
        kinds = {"F": "f", "I": "i", "U": "u"}
        dtype = np.dtype(
            [
                (f"f{i}", f"<{kinds[t]}{s}", (c,) if c > 1 else ())
                for i, (s, t, c) in enumerate(zip(sizes, types, counts, strict=True))
            ]
        )
        rec = np.frombuffer(body[: n * dtype.itemsize], dtype=dtype, count=n)
        return np.stack([rec[f"f{c}"].astype(np.float32) for c in cols], axis=1)
    raise ValueError(f"{path}: PCD 'DATA {mode}' is not supported (only ascii and binary)")


def read_ply_xyz(path: PathLike) -> np.ndarray:
    """Vertex positions of a PLY file (point cloud or mesh, ascii or binary), in file order."""
    import trimesh

    loaded = trimesh.load(str(path), process=False)
    verts = getattr(loaded, "vertices", None)
    if verts is None or len(verts) == 0:
        raise ValueError(f"{path}: PLY has no vertices")
    return np.asarray(verts, dtype=np.float32)


def read_obj_vertices(path: PathLike) -> np.ndarray:
    """``v x y z`` lines of an OBJ file in file order (per-vertex labels index these).

    Parsed directly rather than via trimesh, which may merge or reorder vertices.
    """
    rows = [ln.split()[1:4] for ln in Path(path).read_text().splitlines() if ln.startswith("v ")]
    if not rows:
        raise ValueError(f"{path}: OBJ has no vertices")
    return np.asarray(rows, dtype=np.float32)


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .h5 benchmark files needs h5py: pip install h5py") from e
    return h5py


# --------------------------------------------------------------------------------------------------
# Base class.


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

    def category_of(self, index: int) -> str:
        """Category of item ``index`` without reading its file."""
        raise NotImplementedError

    def uid_of(self, index: int) -> str:
        raise NotImplementedError

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

    @staticmethod
    def _check_labels(labels: np.ndarray, num_parts: int, uid: str) -> np.ndarray:
        labels = labels.astype(np.int64, copy=False)
        if labels.size and (labels.min() < -1 or labels.max() >= num_parts):
            raise ValueError(
                f"{uid}: part labels span [{labels.min()}, {labels.max()}], expected -1..{num_parts - 1}"
            )
        return labels


def _select_categories(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
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


def _resolve_part_names(part_names: str | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
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


# --------------------------------------------------------------------------------------------------
# ShapeNetPart.

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


class ShapeNetPartTxt(PartSegDataset):
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

    def __init__(
        self,
        root: PathLike,
        split: ShapeNetSplit = "test",
        categories: Sequence[str] | None = None,
        part_names: str | Mapping[str, Sequence[str]] = "patchalign3d",
    ) -> None:
        super().__init__()
        self.root = Path(root)
        split_dir = self.root / "train_test_split"
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{self.root} is not a ShapeNetPart root: no train_test_split/ directory")
        self.categories = _select_categories(categories, SHAPENETPART_CATEGORIES)
        names = _resolve_part_names(part_names)
        self.part_names_by_category = {c: names[c] for c in self.categories}
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

    def category_of(self, index: int) -> str:
        return self._items[index][0]

    def uid_of(self, index: int) -> str:
        return self._items[index][1]

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
        return PartSegSample(
            uid=uid,
            category=cat,
            points=np.ascontiguousarray(rows[:, :3]),
            labels=labels,
            part_names=list(self.part_names_by_category[cat]),
        )


class ShapeNetPartH5(PartSegDataset):
    """ShapeNetPart's 2048-point hdf5 release (``shapenet_part_seg_hdf5_data``).

    Reads every ``ply_data_<split><i>.h5`` under ``root`` (or ``root/hdf5_data``) into memory once
    (the test split is ~70 MB). uids come from the matching ``ply_data_<split>_<i>_id2file.json``
    when present, else ``<file stem>/<row>``. Category ids follow ``all_object_categories.txt``
    when present, else the benchmark's fixed order.
    """

    name = "shapenetpart_h5"

    def __init__(
        self,
        root: PathLike,
        split: ShapeNetSplit = "test",
        categories: Sequence[str] | None = None,
        part_names: str | Mapping[str, Sequence[str]] = "patchalign3d",
    ) -> None:
        super().__init__()
        h5py = _require_h5py()
        root = Path(root)
        if (root / "hdf5_data").is_dir():
            root = root / "hdf5_data"
        self.root = root
        self.categories = _select_categories(categories, SHAPENETPART_CATEGORIES)
        names = _resolve_part_names(part_names)
        self.part_names_by_category = {c: names[c] for c in self.categories}
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
        return PartSegSample(
            uid=self._uids[index],
            category=cat,
            points=self._points[index],
            labels=self._labels[index],
            part_names=list(self.part_names_by_category[cat]),
        )


# --------------------------------------------------------------------------------------------------
# PartNetE.


class PartNetE(PartSegDataset):
    """PartNet-Ensembled (PartSLIP) test data.

    Layout: ``<root>/<split>/<Category>/<id>/pc.ply`` (coloured point cloud) and ``label.npy``
    (``np.save`` of a dict; ``semantic_seg`` is 0-indexed into ``PartNetE_meta.json[Category]``,
    ``-1`` = not a part). ``<root>`` may also be the ``data/`` directory of the PartSLIP download.
    An ``<id>`` directory without both files is counted as missing.

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
        self.categories = _select_categories(categories, sorted(meta))
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

    def category_of(self, index: int) -> str:
        return self._items[index][0]

    def uid_of(self, index: int) -> str:
        return self._items[index][1]

    def __getitem__(self, index: int) -> PartSegSample:
        cat, uid, d = self._items[index]
        points = read_ply_xyz(d / "pc.ply")
        raw = np.load(d / "label.npy", allow_pickle=True)
        lab = raw.item() if raw.dtype == object and raw.shape == () else raw
        if not isinstance(lab, Mapping) or "semantic_seg" not in lab:
            raise ValueError(f"{d / 'label.npy'}: expected a dict with 'semantic_seg'")
        labels = np.asarray(lab["semantic_seg"]).reshape(-1)
        if labels.shape[0] != points.shape[0]:
            raise ValueError(f"{uid}: {points.shape[0]} points but {labels.shape[0]} labels")
        labels = self._check_labels(labels, len(self.part_names_by_category[cat]), uid)
        return PartSegSample(
            uid=uid,
            category=cat,
            points=points,
            labels=labels,
            part_names=list(self.part_names_by_category[cat]),
        )


# --------------------------------------------------------------------------------------------------
# FAUST (SATR annotations).


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
        return PartSegSample(
            uid=name,
            category="human",
            points=points,
            labels=labels,
            part_names=list(self.part_names_by_category["human"]),
        )


# --------------------------------------------------------------------------------------------------
# ScanObjectNN.


class ScanObjectNNParts(PartSegDataset):
    """ScanObjectNN's part-annotated release (``object_dataset_complete_with_parts_``).

    ``split_new.txt`` rows are ``<file>\\t<category id>[\\tt]`` (``t`` = test). ``<file>.bin`` is
    float32 ``[n, n x 11 (x y z nx ny nz r g b instance semantic)]`` and ``<file>_part.bin`` is
    ``[n, n x 2]`` with the raw part id last; raw ids are remapped per category as COPS does and
    named with COPS's vocabulary, whose part 0 is ``"background"`` (the scans keep their clutter).
    """

    name = "scanobjectnn_parts"

    def __init__(
        self,
        root: PathLike,
        split: Literal["train", "test"] = "test",
        categories: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        root = Path(root)
        for cand in (
            root / "object_dataset_complete_with_parts_",
            root / "object_dataset_complete_with_parts",
        ):
            if (cand / "split_new.txt").is_file():
                root = cand
        split_file = root / "split_new.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"ScanObjectNN split file {split_file} not found")
        self.root = root
        self.categories = _select_categories(categories, SCANOBJECTNN_CATEGORIES)
        self.part_names_by_category = {c: list(SCANOBJECTNN_PARTS[c]) for c in self.categories}
        for line in split_file.read_text().splitlines():
            cols = line.strip().split("\t") if "\t" in line else line.split()
            if len(cols) < 2:
                continue
            is_test = len(cols) >= 3 and cols[2].strip() == "t"
            if is_test != (split == "test"):
                continue
            cat = SCANOBJECTNN_CATEGORIES[int(cols[1])]
            if cat not in self.part_names_by_category:
                continue
            stem = cols[0][:-4] if cols[0].endswith(".bin") else cols[0]
            uid = f"{cat}/{stem}"
            if (root / cat / f"{stem}.bin").is_file() and (root / cat / f"{stem}_part.bin").is_file():
                self._items.append((cat, uid, root / cat / stem))
            else:
                self.missing.append(uid)
        self._report_missing(str(split_file))

    def category_of(self, index: int) -> str:
        return self._items[index][0]

    def uid_of(self, index: int) -> str:
        return self._items[index][1]

    @staticmethod
    def _read_bin(path: Path, width: int) -> np.ndarray:
        raw = np.fromfile(path, dtype=np.float32)
        if raw.size < 1 or (raw.size - 1) % width or int(raw[0]) != (raw.size - 1) // width:
            raise ValueError(f"{path}: expected [n, n x {width} floats]")
        return raw[1:].reshape(-1, width)

    def __getitem__(self, index: int) -> PartSegSample:
        cat, uid, stem = self._items[index]
        pc = self._read_bin(stem.with_name(stem.name + ".bin"), 11)
        part = self._read_bin(stem.with_name(stem.name + "_part.bin"), 2)
        if part.shape[0] != pc.shape[0]:
            raise ValueError(f"{uid}: {pc.shape[0]} points but {part.shape[0]} part labels")
        raw = part[:, -1].astype(np.int64)
        remap = np.asarray(
            SCANOBJECTNN_PART_REMAP.get(cat, range(len(SCANOBJECTNN_PARTS[cat]))), dtype=np.int64
        )
        if raw.min() < 0 or raw.max() >= len(remap):
            raise ValueError(
                f"{uid}: raw part ids span [{raw.min()}, {raw.max()}], expected 0..{len(remap) - 1}"
            )
        labels = self._check_labels(remap[raw], len(SCANOBJECTNN_PARTS[cat]), uid)
        return PartSegSample(
            uid=uid,
            category=cat,
            points=np.ascontiguousarray(pc[:, :3]),
            labels=labels,
            part_names=list(self.part_names_by_category[cat]),
        )


class ScanObjectNNH5(PartSegDataset):
    """ScanObjectNN's ``h5_files`` release (``data (S, 2048, 3)``, ``label (S,)``, ``mask (S, 2048)``).

    The h5 release carries no part labels; its per-point ``mask`` separates the object
    (``mask != -1``) from the background clutter (``-1``), so this reader evaluates the two-part
    segmentation ``["background", <category>]``.

    Args:
        root: an ``.h5`` file, or a directory holding ``<variant>/<split>_objectdataset<suffix>.h5``.
        variant: sub-directory (``main_split``, ``main_split_nobg``, ...).
        suffix: file-name suffix (``""``, ``"_augmentedrot_scale75"``, ...).
    """

    name = "scanobjectnn_h5"

    def __init__(
        self,
        root: PathLike,
        split: Literal["train", "test"] = "test",
        variant: str = "main_split",
        suffix: str = "",
        categories: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        h5py = _require_h5py()
        root = Path(root)
        prefix = "training" if split == "train" else "test"
        path = root if root.is_file() else root / variant / f"{prefix}_objectdataset{suffix}.h5"
        if not path.is_file() and (root / f"{prefix}_objectdataset{suffix}.h5").is_file():
            path = root / f"{prefix}_objectdataset{suffix}.h5"
        if not path.is_file():
            raise FileNotFoundError(f"ScanObjectNN h5 file {path} not found")
        self.path = path
        with h5py.File(path, "r") as h:
            if "mask" not in h:
                raise ValueError(f"{path} has no per-point 'mask' dataset (keys: {list(h.keys())})")
            self._points = np.asarray(h["data"], dtype=np.float32)[..., :3]
            self._cat_ids = np.asarray(h["label"]).reshape(-1).astype(np.int64)
            self._mask = np.asarray(h["mask"]).astype(np.int64)
        self.categories = _select_categories(categories, SCANOBJECTNN_CATEGORIES)
        self.part_names_by_category = {c: ["background", c] for c in self.categories}
        keep = {SCANOBJECTNN_CATEGORIES.index(c) for c in self.categories}
        self._items = [i for i, c in enumerate(self._cat_ids) if int(c) in keep]

    def category_of(self, index: int) -> str:
        return SCANOBJECTNN_CATEGORIES[int(self._cat_ids[self._items[index]])]

    def uid_of(self, index: int) -> str:
        return f"{self.path.stem}/{self._items[index]}"

    def __getitem__(self, index: int) -> PartSegSample:
        row = self._items[index]
        cat = self.category_of(index)
        labels = (self._mask[row] != -1).astype(np.int64)
        return PartSegSample(
            uid=self.uid_of(index),
            category=cat,
            points=self._points[row],
            labels=labels,
            part_names=list(self.part_names_by_category[cat]),
        )


# --------------------------------------------------------------------------------------------------
# Objaverse (Find3D benchmark).


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
        self.categories = _select_categories(categories, all_cats)
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

    def category_of(self, index: int) -> str:
        return self._items[index][0]

    def uid_of(self, index: int) -> str:
        return self._items[index][1]

    def __getitem__(self, index: int) -> PartSegSample:
        cat, uid, d = self._items[index]
        names = self._read_names(d)
        points = read_pcd_xyz(d / "points5000.pcd")
        labels = np.load(d / "labels.npy").reshape(-1).astype(np.int64) - 1  # 0 (unlabeled) -> -1
        if labels.shape[0] != points.shape[0]:
            raise ValueError(f"{uid}: {points.shape[0]} points but {labels.shape[0]} labels")
        labels = self._check_labels(labels, len(names), uid)
        return PartSegSample(uid=uid, category=cat, points=points, labels=labels, part_names=names)


# --------------------------------------------------------------------------------------------------
# Protocol-side wrappers: normalisation + seeded sampling, and batching.


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre on the centroid and scale the farthest point to radius 1 (Point-BERT's ``pc_normalize``)."""
    centred = points - points.mean(axis=0, keepdims=True)
    scale = float(np.sqrt((centred**2).sum(axis=1)).max())
    return (centred / scale if scale > 0 else centred).astype(np.float32)


def shape_rng(seed: int, uid: str) -> np.random.Generator:
    """A generator that depends only on ``(seed, uid)``: the same points for a shape whatever the
    dataset order, subset, worker count or rank."""
    return np.random.default_rng([int(seed), zlib.crc32(uid.encode())])


class ResampledDataset(Dataset):
    """Wrap a reader with the evaluation protocol's preprocessing.

    Each shape is normalised to the unit sphere and ``num_points`` points are drawn with a generator
    seeded by ``(seed, uid)``. ``replace=True`` reproduces Point-BERT / the released PatchAlign3D
    loader (``np.random.choice(n, 2048, replace=True)``); ``replace=False`` draws distinct points
    when the shape has enough. ``num_points=None`` keeps every point (batch size 1 then).

    Items gain ``index`` (position in the wrapped reader) and keep every other field.
    """

    def __init__(
        self,
        dataset: PartSegDataset,
        num_points: int | None = 2048,
        seed: int = 0,
        normalize: bool = True,
        replace: bool = True,
    ) -> None:
        if num_points is not None and num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.dataset = dataset
        self.num_points = num_points
        self.seed = seed
        self.normalize = normalize
        self.replace = replace

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # Reader attributes (categories, part_names_by_category, missing, ...) pass through.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        points, labels = sample["points"], sample["labels"]
        if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] == 0:
            raise ValueError(f"{sample['uid']}: points must be a non-empty (N, 3) array, got {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError(f"{sample['uid']}: points contain NaN/Inf")
        if self.normalize:
            points = normalize_unit_sphere(points)
        if self.num_points is not None:
            n = points.shape[0]
            replace = self.replace or n < self.num_points
            choice = shape_rng(self.seed, sample["uid"]).choice(n, self.num_points, replace=replace)
            points, labels = points[choice], labels[choice]
        sample.update(points=np.ascontiguousarray(points, dtype=np.float32), labels=labels, index=index)
        return sample


def collate_part_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack equally sized samples: ``points (B, N, 3)``, ``labels (B, N)``, ``index (B,)``; the
    string fields stay lists."""
    sizes = {int(s["points"].shape[0]) for s in batch}
    if len(sizes) != 1:
        raise ValueError(
            f"cannot batch shapes with different point counts {sorted(sizes)}; resample them first"
        )
    out: dict[str, Any] = {
        "points": torch.from_numpy(np.stack([s["points"] for s in batch])).float(),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in batch])).long(),
        "uid": [s["uid"] for s in batch],
        "category": [s["category"] for s in batch],
        "part_names": [list(s["part_names"]) for s in batch],
    }
    out["index"] = torch.as_tensor([int(s.get("index", -1)) for s in batch], dtype=torch.long)
    return out


DatasetKind = Literal[
    "shapenetpart", "shapenetpart_h5", "partnete", "faust", "scanobjectnn", "scanobjectnn_h5", "objaverse"
]


def build_dataset(
    kind: DatasetKind,
    root: PathLike,
    split: str = "test",
    categories: Sequence[str] | None = None,
    part_names: str | Mapping[str, Sequence[str]] = "patchalign3d",
    **kwargs: Any,
) -> PartSegDataset:
    """Construct a reader by name (the datamodule's and the CLI's entry point).

    ``part_names`` applies to ShapeNetPart only; the other benchmarks fix their vocabulary.
    ``split`` is ignored by FAUST (test only); for Objaverse it is ``seenclass|unseen|shapenetpart``.
    """
    if kind == "shapenetpart":
        return ShapeNetPartTxt(root, split, categories, part_names)  # type: ignore[arg-type]
    if kind == "shapenetpart_h5":
        return ShapeNetPartH5(root, split, categories, part_names)  # type: ignore[arg-type]
    if kind == "partnete":
        return PartNetE(root, split, categories, **kwargs)
    if kind == "faust":
        return FaustSATR(root, **kwargs)
    if kind == "scanobjectnn":
        return ScanObjectNNParts(root, split, categories)  # type: ignore[arg-type]
    if kind == "scanobjectnn_h5":
        return ScanObjectNNH5(root, split, categories=categories, **kwargs)  # type: ignore[arg-type]
    if kind == "objaverse":
        return ObjaverseFind3D(root, split, categories)
    raise ValueError(f"unknown dataset kind {kind!r}")
