"""The evaluation protocol's preprocessing, the same for every benchmark: unit-sphere normalisation,
points drawn with a generator seeded per shape uid, and batching.

Reproduces Point-BERT's ``pc_normalize`` and the released PatchAlign3D loader's
``np.random.choice(n, 2048, replace=True)`` draw (dickoah/PatchAlign3D; the released segmenter
``src/tools/patch_align_segmenter.py`` normalises the same way), with a per-uid seed so the points
do not depend on order, worker count or rank.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from patchalign.eval.readers.base import PartSegDataset
from patchalign.geometry import normalize_unit_sphere_centroid


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """The protocol's normalisation: :func:`patchalign.geometry.normalize_unit_sphere_centroid`
    (centroid, farthest point at radius 1; a one-point shape stays centred). Kept under this name
    for callers that import it from here."""
    return normalize_unit_sphere_centroid(points, allow_degenerate=True)


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
