"""Decoded per-rank training cache: read the shards once, then build batches with batched torch.

Why: the streaming loader spends its time decoding tar members and gathering rows in
Python per sample, ~100-200 samples/s per worker for 7.75 MB Stage 1 samples, far below what one
GPU trains. Compact samples (points + packed part bits + the released 128-patch targets, ~270 KB)
of a whole training set fit in host RAM (28.8 k objects ~ 8 GB) and in one GPU's memory, so:

* **build** (:func:`build_cache`): one deterministic pass over *this rank's* slot plan (the same
  :func:`~patchalign.data.pipeline.partition_samples` split the streaming path uses), through the
  same decode stages and skip accounting, spread over loader workers. Each object keeps a fixed
  subset of ``cache_points`` points (all of them by default: the smallest ``N`` on the rank).
* **batches** (:class:`CachedTrainLoader`): every batch is a pure function of
  ``(seed, epoch, rank, batch index)``: an epoch-seeded permutation picks the shapes, then random
  point subsampling, the up-axis rotation and scale (applied identically to the stored patch
  centres) and bit-unpacking of part membership run as a handful of batched tensor ops on the
  cache's device (host, or the GPU with ``device``).

What stays exactly as streaming: the per-rank partition, ``batches_per_epoch`` (equal on every
rank), resume at ``(epoch, batches done)`` (the loader starts at that batch index), and the skip
counts (counted while building, checked against ``max_skip_fraction``). What differs: the random
stream (same distributions, different draws) and, with ``cache_points`` below ``N``, subsampling
from a fixed per-object subset rather than from all stored points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from patchalign.data.pipeline import (
    DataQualityError,
    ExampleConfig,
    SkipCounter,
    SlotPlan,
    StreamStats,
    counted_map,
    decode_objects,
    finite_fp16_row_max,
    keep_keys,
    rotation_about_axes,
    stable_seed,
    tar_samples,
    track_shards,
    up_axis_index,
)
from patchalign.data.schema import ObjectSample, ShardFormatError

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # np.packbits order (MSB first)
_BYTE_TABLE = ((torch.arange(256, dtype=torch.uint8)[:, None] & _BITS) != 0).float()  # byte -> 8 bits


@dataclass
class DecodedCache:
    """All of one rank's training objects, decoded and stacked (``n`` objects, ``Nc`` points each).

    Attributes:
        points: ``(n, Nc, 3)`` float32.
        membership: ``(n, Nc, ceil(Lmax/8))`` uint8, ``np.packbits`` of each point's part bits.
        n_parts: ``(n,)`` int64 parts per object; label_ids ``(n, Lmax)`` int64, -1 padded.
        up_axis: ``(n,)`` int64 axis index (0/1/2) for the rotation augmentation.
        features: ``(n, Nc, C)`` float16 per-point teacher features, or ``None``.
        patch_centers: ``(n, G0, 3)`` float32 (NaN rows pad objects with fewer), or ``None``.
        patch_features: ``(n, G0, C)`` float16, or ``None``.
    """

    points: Tensor
    membership: Tensor
    n_parts: Tensor
    label_ids: Tensor
    up_axis: Tensor
    uids: list[str]
    categories: list[str]
    features: Tensor | None = None
    patch_centers: Tensor | None = None
    patch_features: Tensor | None = None

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def tensors(self) -> dict[str, Tensor]:
        names = ("points", "membership", "n_parts", "label_ids", "up_axis", "features")
        out = {k: getattr(self, k) for k in (*names, "patch_centers", "patch_features")}
        return {k: v for k, v in out.items() if v is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str) -> DecodedCache:
        kw = {k: v.to(device) for k, v in self.tensors.items()}
        return DecodedCache(uids=self.uids, categories=self.categories, **kw)


# ------------------------------------------------------------------------------------------ build
@dataclass(frozen=True)
class _Compact:
    """One object reduced to what the cache keeps (picklable: travels from build workers)."""

    uid: str
    category: str
    points: np.ndarray
    membership: np.ndarray  # packed (N', ceil(L/8)) uint8
    label_ids: np.ndarray
    up_axis: int
    features: np.ndarray | None
    patch_centers: np.ndarray | None
    patch_features: np.ndarray | None


def _compact(
    s: ObjectSample, ids: np.ndarray, cfg: ExampleConfig, cache_points: int | None, seed: int
) -> _Compact:
    up_axis = up_axis_index(s, cfg)
    n = s.num_points
    if cache_points is not None and n < cache_points:
        raise ShardFormatError(
            f"sample {s.uid!r}: {n} points < cache_points={cache_points}", "too_few_points"
        )
    # Stored in a random order per object (seeded by uid): batches then take one random index set
    # for all shapes (see make_cached_batch); a fixed subset when cache_points < N.
    idx = np.random.default_rng(stable_seed(seed, "cache-order", s.uid)).permutation(n)
    if cache_points is not None and n > cache_points:
        idx = idx[:cache_points]
    feats = None
    if cfg.load_features and s.features.shape[1] > 0:
        feats = np.ascontiguousarray(s.features[idx])
        finite_fp16_row_max(s.uid, feats)
    with_patches = cfg.load_features and s.patch_centers is not None
    return _Compact(
        uid=s.uid,
        category=str(s.meta.get("category", "")),
        points=np.ascontiguousarray(s.points[idx], dtype=np.float32),
        membership=np.packbits(s.membership[idx], axis=1),
        label_ids=np.asarray(ids, np.int64),
        up_axis=up_axis,
        features=feats,
        patch_centers=np.array(s.patch_centers, np.float32) if with_patches else None,
        patch_features=np.array(s.patch_features) if with_patches else None,
    )


class _BuildStream(torch.utils.data.IterableDataset):
    """One pass over a rank's plan, each loader worker taking a disjoint share, yielding compact objects.

    Shares are whole shards, round-robin; with fewer shards than workers, worker 0 reads them all
    (tiny sets only) so every sample and every shard error is counted exactly once. Each item
    carries the worker's skip-count delta; a final ``None`` object carries the rest.
    """

    def __init__(
        self,
        plan: SlotPlan,
        cfg: ExampleConfig,
        lookup: dict[str, int] | None,
        cache_points: int | None,
        seed: int,
    ) -> None:
        super().__init__()
        self.plan, self.cfg, self.lookup, self.cache_points, self.seed = plan, cfg, lookup, cache_points, seed

    def __iter__(self) -> Iterator[tuple[_Compact | None, dict[str, int]]]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.plan.urls
        mine = urls[w::nw] if len(urls) >= nw else (urls if w == 0 else [])
        stats = StreamStats(split="train")
        if mine:
            src = wds.DataPipeline(
                wds.SimpleShardList(mine),
                track_shards(stats),
                tar_samples(stats.tar_handler),
                keep_keys(self.plan.keys),
                decode_objects(stats, self.cfg.num_points, self.lookup),
                counted_map(stats, lambda s, ids: _compact(s, ids, self.cfg, self.cache_points, self.seed)),
            )
            for c in src:
                yield c, stats.take_delta()
        yield None, stats.take_delta()


def build_cache(
    plan: SlotPlan,
    cfg: ExampleConfig,
    lookup: dict[str, int] | None,
    counter: SkipCounter,
    num_workers: int = 0,
    cache_points: int | None = None,
    seed: int = 0,
    max_bytes: int | None = None,
) -> DecodedCache:
    """Decode every sample of ``plan`` once into a :class:`DecodedCache` (host memory).

    Skips are counted into ``counter`` (and checked, as a finished pass) exactly like a streaming
    pass. ``cache_points=None`` keeps ``min N`` points per object (all of them for Find3D's fixed
    5000); objects with fewer than an explicit ``cache_points`` are skipped as ``too_few_points``.

    Raises:
        DataQualityError: no object survived, or too many were skipped.
        MemoryError: the cache would exceed ``max_bytes`` (message says what to change).
    """
    stream = _BuildStream(plan, cfg, lookup, cache_points, seed)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(0)
    )
    items: list[_Compact] = []
    n_bytes = 0
    for c, delta in loader:
        counter.update(delta)
        if c is None:
            continue
        items.append(c)
        n_bytes += sum(
            a.nbytes for a in (c.points, c.membership, c.features, c.patch_features) if a is not None
        )
        if max_bytes is not None and n_bytes > max_bytes:
            raise MemoryError(
                f"decoded cache passed {max_bytes / 1e9:.1f} GB after {len(items)} objects "
                f"({n_bytes / len(items) / 1e6:.2f} MB each): use compact patch-target shards, a smaller "
                "cache_points, raise cache_max_gb, or set cache: off to stream"
            )
    counter.check(final=True)
    if not items:
        raise DataQualityError(f"[train] the decoded cache is empty: {counter.as_dict()}")
    items.sort(key=lambda c: c.uid)  # independent of worker interleaving
    return _stack(items)


def _stack(items: list[_Compact]) -> DecodedCache:
    n_store = min(c.points.shape[0] for c in items)
    l_max = max(1, max(c.label_ids.shape[0] for c in items))
    lb = (l_max + 7) // 8
    n = len(items)
    points = np.empty((n, n_store, 3), np.float32)
    membership = np.zeros((n, n_store, lb), np.uint8)
    label_ids = np.full((n, l_max), -1, np.int64)
    kinds = {(c.features is None, c.patch_centers is None) for c in items}
    if len(kinds) > 1:
        raise ShardFormatError(
            "the shard set mixes samples with and without teacher targets", "mixed_targets"
        )
    feats = None
    if items[0].features is not None:
        feats = np.empty((n, n_store, items[0].features.shape[1]), np.float16)
    centers = pfeats = None
    if items[0].patch_centers is not None:
        g0 = max(c.patch_centers.shape[0] for c in items)
        centers = np.full((n, g0, 3), np.nan, np.float32)
        pfeats = np.zeros((n, g0, items[0].patch_features.shape[1]), np.float16)
    for i, c in enumerate(items):
        k = c.points.shape[0]
        # objects with more points keep their first n_store (randomly ordered) points
        take = slice(None) if k == n_store else slice(0, n_store)
        points[i] = c.points[take]
        membership[i, :, : c.membership.shape[1]] = c.membership[take]
        label_ids[i, : c.label_ids.shape[0]] = c.label_ids
        if feats is not None:
            feats[i] = c.features[take]
        if centers is not None:
            g = c.patch_centers.shape[0]
            centers[i, :g] = c.patch_centers
            pfeats[i, :g] = c.patch_features
    return DecodedCache(
        points=torch.from_numpy(points),
        membership=torch.from_numpy(membership),
        n_parts=torch.tensor([c.label_ids.shape[0] for c in items], dtype=torch.int64),
        label_ids=torch.from_numpy(label_ids),
        up_axis=torch.tensor([c.up_axis for c in items], dtype=torch.int64),
        uids=[c.uid for c in items],
        categories=[c.category for c in items],
        features=None if feats is None else torch.from_numpy(feats),
        patch_centers=None if centers is None else torch.from_numpy(centers),
        patch_features=None if pfeats is None else torch.from_numpy(pfeats),
    )


# ------------------------------------------------------------------------------------------ batches
def unpack_bits(packed: Tensor, count: int, dtype: torch.dtype = torch.bool) -> Tensor:
    """Inverse of ``np.packbits(..., axis=-1)``: ``(..., ceil(count/8))`` uint8 -> ``(..., count)``.

    One table lookup per byte (256 x 8 table), no per-bit arithmetic.
    """
    table = _BYTE_TABLE.to(device=packed.device, dtype=dtype)
    return table[packed.long()].flatten(-2)[..., :count]


def make_cached_batch(
    cache: DecodedCache,
    idx: Tensor,
    cfg: ExampleConfig,
    gen: torch.Generator,
    augment: bool = True,
    features_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """One training batch of the shapes ``idx`` (a :class:`ShardDataModule` batch, same keys and dtypes)."""
    dev = cache.points.device
    b, n_store = idx.shape[0], cache.points.shape[1]
    p = cfg.num_points
    if p > n_store:
        raise ValueError(f"num_points={p} but the cache keeps {n_store} points per object")
    # Without replacement: one random index set per batch applied to every shape's stored points,
    # which the build shuffled independently per object, so each shape's subset is still a fresh
    # uniform draw every time (a per-shape argsort of B x N keys costs ~10x more on a CPU).
    sel = torch.randperm(n_store, generator=gen, device=dev)[:p]
    flat = (idx[:, None] * n_store + sel[None, :]).reshape(-1)  # one gather of B x P rows per array

    def gather(t: Tensor) -> Tensor:
        return t.reshape(-1, t.shape[-1]).index_select(0, flat).reshape(b, p, t.shape[-1])

    points = gather(cache.points)
    n_parts = cache.n_parts[idx]
    l_max = max(1, int(n_parts.max()))
    membership = unpack_bits(gather(cache.membership), l_max, torch.float32)
    label_ids = cache.label_ids[idx, :l_max]
    label_mask = torch.arange(l_max, device=dev)[None, :] < n_parts[:, None]
    centers = cache.patch_centers[idx] if cache.patch_centers is not None else None
    if augment and (cfg.rotate_up or cfg.scale_range is not None):
        tf = torch.eye(3, device=dev).expand(b, 3, 3)
        if cfg.rotate_up:
            angles = torch.rand(b, generator=gen, device=dev) * (2.0 * math.pi)
            tf = rotation_about_axes(angles, cache.up_axis[idx])
        if cfg.scale_range is not None:
            lo, hi = cfg.scale_range
            scale = lo + (hi - lo) * torch.rand(b, generator=gen, device=dev)
            tf = tf * scale[:, None, None]
        points = points @ tf.transpose(1, 2)
        if centers is not None:
            centers = centers @ tf.transpose(1, 2)  # NaN padding rows stay NaN
    if cache.features is not None:
        feats = gather(cache.features)
        feature_mask = (feats != 0).any(-1)
        feats = feats.to(features_dtype)
    else:
        feats = torch.zeros(b, p, 0, dtype=features_dtype, device=dev)
        feature_mask = torch.ones(b, p, dtype=torch.bool, device=dev)
    order = idx.tolist()
    batch: dict[str, Any] = {
        "points": points.contiguous(),
        "features": feats,
        "feature_mask": feature_mask,
        "membership": membership,
        "label_ids": label_ids,
        "label_mask": label_mask,
        "valid": torch.ones(b, dtype=torch.bool, device=dev),
        "uid": [cache.uids[i] for i in order],
        "category": [cache.categories[i] for i in order],
    }
    if centers is not None:
        batch["patch_centers"] = centers.contiguous()
        batch["patch_features"] = cache.patch_features[idx].to(features_dtype)
    return batch


class CachedTrainLoader:
    """Iterable of exactly ``batches_per_epoch`` batches per epoch from a :class:`DecodedCache`.

    Shapes are drawn as consecutive slices of epoch-seeded permutations of the cache (a fresh
    permutation whenever one is used up, so every object is seen before any repeats), and batch
    ``k``'s random draws come from a generator seeded by ``(seed, epoch, rank, k)``. Resuming at
    ``(epoch, done)`` therefore starts at batch ``done`` and yields the same batches an
    uninterrupted run would.
    """

    def __init__(
        self,
        cache: DecodedCache,
        batch_size: int,
        batches_per_epoch: int,
        cfg: ExampleConfig,
        seed: int,
        rank: int,
        counter: SkipCounter,
        epoch_fn: Callable[[], int] | None = None,
        position_fn: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.cache, self.batch_size, self.batches_per_epoch = cache, batch_size, batches_per_epoch
        self.cfg, self.seed, self.rank, self.counter = cfg, seed, rank, counter
        self.epoch_fn, self.position_fn = epoch_fn, position_fn
        self.features_dtype = torch.float16 if cfg.features_fp16 else torch.float32
        self._passes = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _indices(self, epoch: int, k: int) -> Tensor:
        n, bs = len(self.cache), self.batch_size
        start, stop = k * bs, (k + 1) * bs
        out = []
        for r in range(start // n, (stop - 1) // n + 1):  # permutations touched by this batch
            g = torch.Generator().manual_seed(stable_seed(self.seed, "cache-order", epoch, self.rank, r))
            perm = torch.randperm(n, generator=g)
            lo, hi = max(start - r * n, 0), min(stop - r * n, n)
            out.append(perm[lo:hi])
        return torch.cat(out).to(self.cache.points.device)

    def batch(self, epoch: int, k: int) -> dict[str, Any]:
        dev = self.cache.points.device
        gen = torch.Generator(device=dev).manual_seed(
            stable_seed(self.seed, "cache-batch", epoch, self.rank, k)
        )
        return make_cached_batch(
            self.cache, self._indices(epoch, k), self.cfg, gen, True, self.features_dtype
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._passes
        done = 0
        if self.position_fn is not None:
            epoch, done = self.position_fn()
        self._passes += 1
        for k in range(done, self.batches_per_epoch):
            yield self.batch(epoch, k)


__all__ = [
    "CachedTrainLoader",
    "DecodedCache",
    "build_cache",
    "make_cached_batch",
    "unpack_bits",
]
