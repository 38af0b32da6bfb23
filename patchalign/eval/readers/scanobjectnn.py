"""ScanObjectNN readers: the part-annotated release ``object_dataset_complete_with_parts_``
(``split_new.txt``, ``<category>/<file>.bin`` + ``<file>_part.bin``) with COPS's part names, and the
``h5_files`` release, whose only per-point annotation is object vs background.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self.categories = select_categories(categories, SCANOBJECTNN_CATEGORIES)
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
        return self._sample(uid, cat, np.ascontiguousarray(pc[:, :3]), labels)


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
        h5py = require_h5py()
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
        self.categories = select_categories(categories, SCANOBJECTNN_CATEGORIES)
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
        return self._sample(self.uid_of(index), cat, self._points[row], labels)


@register_reader("scanobjectnn")
def _parts(root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any) -> PartSegDataset:
    return ScanObjectNNParts(root, split, categories)  # type: ignore[arg-type]


@register_reader("scanobjectnn_h5")
def _h5(
    root: PathLike, split: str, categories: Sequence[str] | None, part_names: Any, **kw: Any
) -> PartSegDataset:
    return ScanObjectNNH5(root, split, categories=categories, **kw)  # type: ignore[arg-type]
