"""Random, schema-valid shard sets for tests and the loader benchmark (not training data).

The geometry is meaningless (points on a unit sphere, parts = spherical caps) but every array has
the real dtype and shape, so byte counts and decode costs match real shards of the same ``N``/``C``.
Realistic demo data comes from :mod:`patchalign.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from patchalign.data.schema import ObjectSample
from patchalign.data.textbank import save_text_bank
from patchalign.data.writer import ShardSetWriter

DEFAULT_PARTS = ("back", "seat", "leg", "arm", "wheel", "handle", "lid", "body")

Targets = Literal["points", "patches", "both", "none"]
"""Stage 1 targets a synthetic sample carries: per-point features, released-style patch targets
(``G0`` stored centres + one feature each, the compact layout), both, or none (Stage 2 only)."""


def random_object_sample(
    uid: str,
    rng: np.random.Generator,
    num_points: int = 2048,
    feature_dim: int = 16,
    part_names: Sequence[str] = DEFAULT_PARTS[:3],
    category: str = "synthetic",
    targets: Targets = "points",
    n_patches: int = 128,
) -> ObjectSample:
    """One valid sample: unit-sphere points, unit fp16 features, parts as (overlapping) caps.

    With ``targets`` ``"patches"``/``"both"`` it also carries ``n_patches`` stored centres (a random
    subset of the points, as the released code stores FPS-chosen points) with unit fp16 features.
    """
    pts = rng.standard_normal((num_points, 3)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    feats = rng.standard_normal((num_points, feature_dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dirs = rng.standard_normal((len(part_names), 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    membership = (pts @ dirs.T) > 0.5  # caps of ~25% of the sphere each, may overlap
    centers = patch_feats = None
    if targets in ("patches", "both"):
        centers = pts[rng.choice(num_points, min(n_patches, num_points), replace=False)].copy()
        patch_feats = rng.standard_normal((centers.shape[0], feature_dim)).astype(np.float32)
        patch_feats = (patch_feats / np.linalg.norm(patch_feats, axis=1, keepdims=True)).astype(np.float16)
    if targets in ("patches", "none"):
        feats = np.zeros((num_points, 0), np.float32)
    return ObjectSample(
        uid=uid,
        points=pts,
        features=feats.astype(np.float16),
        membership=membership,
        part_names=list(part_names),
        meta={"category": category, "source": "synthetic", "up_axis": "y", "teacher": "random"},
        patch_centers=centers,
        patch_features=patch_feats,
    )


def write_synthetic_text_bank(path: str | Path, names: Sequence[str] = DEFAULT_PARTS, dim: int = 8) -> Path:
    """Text bank with random vectors for ``names``."""
    g = torch.Generator().manual_seed(0)
    save_text_bank(path, list(names), torch.randn(len(names), dim, generator=g), "random-test", ["{}"])
    return Path(path)


def shard_sizes(n_objects: int, per_shard: int) -> list[int]:
    """``n_objects`` split into shards of ``per_shard`` samples, the last one holding the remainder."""
    return [per_shard] * (n_objects // per_shard) + ([n_objects % per_shard] if n_objects % per_shard else [])


def write_synthetic_shards(
    out_dir: str | Path,
    shard_sizes: Sequence[int],
    num_points: int = 2048,
    feature_dim: int = 16,
    seed: int = 0,
    uid_prefix: str = "obj",
    with_text_bank: bool = True,
    targets: Targets = "points",
    n_patches: int = 128,
) -> Path:
    """Write ``len(shard_sizes)`` shards holding the given numbers of samples; returns the manifest path."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    bank = write_synthetic_text_bank(out_dir / "_bank.safetensors") if with_text_bank else None
    total = 0
    with ShardSetWriter(out_dir, max_samples_per_shard=max(shard_sizes), text_bank=bank) as w:
        for size in shard_sizes:
            for _ in range(size):
                k = int(rng.integers(1, 4))
                names = [DEFAULT_PARTS[i] for i in sorted(rng.choice(len(DEFAULT_PARTS), k, replace=False))]
                w.write(
                    random_object_sample(
                        f"{uid_prefix}-{total:05d}",
                        rng,
                        num_points,
                        feature_dim,
                        names,
                        targets=targets,
                        n_patches=n_patches,
                    )
                )
                total += 1
            w.finish_shard()  # shard boundaries exactly where the caller asked
        path = w.close()
    if bank is not None:
        bank.unlink()
    return path
