"""Streaming pipeline pieces: sample partitioning, WebDataset stages, batching and skip accounting.

Everything here is plain Python/numpy/torch and independent of Lightning; :mod:`.datamodule` wires
it into a ``LightningDataModule``. Each builder returns one small WebDataset stage so the training
and validation pipelines are readable lists of steps (see :func:`build_train_pipeline`).

Two invariants matter in DDP and are enforced here rather than hoped for:

* every rank yields the **same number of batches** per epoch (training: an infinite resampled
  stream cut by ``with_epoch``; validation: each slot padded to the same batch count), so no rank
  waits forever in a collective for a rank that ran out of data;
* the ranks' samples are **disjoint** (shards, or samples when there are fewer shards than slots,
  are partitioned from the manifest, identically on every rank).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import mmap
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds

from patchalign.data.schema import (
    ObjectSample,
    ShardFormatError,
    decode_sample,
    sample_key,
)
from patchalign.data.writer import ShardInfo

log = logging.getLogger(__name__)

Example = dict[str, Any]
Batch = dict[str, Any]
STATS_KEY = "_stats"
"""Batch key carrying a worker's skip-count delta; the loader pops it before the batch reaches the model."""

MAX_CONSECUTIVE_SKIPS = 200
"""A worker that skips this many samples/shards in a row without one good sample raises instead of
spinning forever on an infinite resampled stream of broken data."""

_AXIS = {"x": 0, "y": 1, "z": 2}
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset's skip_meta: archive-level metadata members


class DataQualityError(RuntimeError):
    """Too much of the data was skipped (or none could be read); the message lists the reasons."""


def stable_seed(*parts: object) -> int:
    """Process-independent 63-bit seed from arbitrary parts (``hash()`` is salted per process)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# --------------------------------------------------------------------------------------- skip stats
@dataclass
class StreamStats:
    """Per-worker counts of samples seen and skipped (by reason), shipped to the main process as deltas.

    ``seen`` counts every unit the worker tried: each raw sample and each shard-level error.
    """

    split: str = "train"
    seen: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    consecutive: int = 0
    shard_serial: int = 0
    current_url: str = ""
    _error_serial: int = -1
    _sent_seen: int = 0
    _sent_skipped: Counter[str] = field(default_factory=Counter)
    _logged: Counter[str] = field(default_factory=Counter)

    def ok(self) -> None:
        self.consecutive = 0

    def attempt(self) -> None:
        self.seen += 1

    def skip(self, reason: str, message: str) -> None:
        """Count and log a skip; raise if the worker has produced nothing for too long."""
        self.skipped[reason] += 1
        self.consecutive += 1
        self._logged[reason] += 1
        n = self._logged[reason]
        if n <= 5 or n % 1000 == 0:
            log.warning("[%s] skipping (%s, #%d): %s", self.split, reason, n, message)
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise DataQualityError(
                f"[{self.split}] {self.consecutive} consecutive samples/shards skipped without a good one; "
                f"counts so far {dict(self.skipped)} (last: {reason}: {message})"
            )

    def tar_handler(self, exn: Exception) -> bool:
        """WebDataset handler hook: count a shard-level error (open/tar/grouping) and continue.

        A truncated tar raises twice (WebDataset's member loop, then its shard loop); both happen
        while the same shard is open, so errors are counted once per opened shard
        (:func:`track_shards` numbers the openings).
        """
        if isinstance(exn, DataQualityError):
            raise exn
        if self._error_serial == self.shard_serial:
            log.debug("[%s] further error in %s: %s", self.split, self.current_url, exn)
            return True
        self._error_serial = self.shard_serial
        reason = "missing_shard" if isinstance(exn, FileNotFoundError) else "tar_error"
        self.seen += 1
        self.skip(reason, f"{self.current_url}: {type(exn).__name__}: {exn}")
        return True

    def take_delta(self) -> dict[str, int]:
        """Counts since the previous call (what the next batch carries)."""
        delta = {"seen": self.seen - self._sent_seen}
        for reason, c in self.skipped.items():
            d = c - self._sent_skipped[reason]
            if d:
                delta[reason] = d
        self._sent_seen = self.seen
        self._sent_skipped = Counter(self.skipped)
        return delta


class SkipCounter:
    """Main-process aggregate of the deltas carried by batches, with the ``max_skip_fraction`` gate."""

    def __init__(self, split: str, max_skip_fraction: float, min_seen: int = 100) -> None:
        self.split = split
        self.max_skip_fraction = max_skip_fraction
        self.min_seen = min_seen
        self.seen = 0
        self.skipped: Counter[str] = Counter()

    def update(self, delta: dict[str, int]) -> None:
        for k, v in delta.items():
            if k == "seen":
                self.seen += v
            else:
                self.skipped[k] += v

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, int]:
        return {"seen": self.seen, "skipped": self.n_skipped, **dict(sorted(self.skipped.items()))}

    def check(self, final: bool = False) -> None:
        """Raise :class:`DataQualityError` if skipped/seen exceeds the limit.

        Before ``min_seen`` samples the ratio is too noisy to judge (one bad sample out of three is
        not a 33% corruption rate), so only ``final`` checks (end of a loader pass) apply then.
        """
        if self.seen == 0 or (not final and self.seen < self.min_seen):
            return
        frac = self.n_skipped / self.seen
        if frac > self.max_skip_fraction:
            raise DataQualityError(
                f"[{self.split}] skipped {self.n_skipped} of {self.seen} samples ({frac:.1%}), more than "
                f"max_skip_fraction={self.max_skip_fraction:.1%}: {dict(self.skipped)}. "
                "Fix or rebuild the shards named in the warnings above."
            )


# --------------------------------------------------------------------------------------- partitioning
@dataclass
class SlotPlan:
    """What one slot (a rank, or a rank's loader worker) reads: shards and optionally a key whitelist."""

    urls: list[str]
    keys: frozenset[str] | None
    n_samples: int


def partition_samples(shards: list[ShardInfo], urls: list[str], n_slots: int) -> list[SlotPlan]:
    """Split a shard set into ``n_slots`` disjoint parts, identically on every process.

    With at least as many shards as slots, whole shards are assigned greedily (largest first, to
    the least-loaded slot) so each slot reads only its own files. With fewer shards, samples are
    dealt round-robin in manifest order and every slot reads all shards, keeping its own keys; this
    costs extra reads but only happens for tiny shard sets.
    """
    if n_slots < 1:
        raise ValueError("n_slots must be >= 1")
    if len(shards) >= n_slots:
        loads = [0] * n_slots
        members: list[list[int]] = [[] for _ in range(n_slots)]
        for i in sorted(range(len(shards)), key=lambda i: (-shards[i].n_samples, i)):
            slot = min(range(n_slots), key=lambda s: (loads[s], s))
            members[slot].append(i)
            loads[slot] += shards[i].n_samples
        return [SlotPlan([urls[i] for i in sorted(m)], None, loads[s]) for s, m in enumerate(members)]
    keys: list[set[str]] = [set() for _ in range(n_slots)]
    used: list[set[int]] = [set() for _ in range(n_slots)]
    j = 0
    for i, info in enumerate(shards):
        for uid in info.uids:
            keys[j % n_slots].add(sample_key(uid))
            used[j % n_slots].add(i)
            j += 1
    return [
        SlotPlan([urls[i] for i in sorted(used[s])], frozenset(keys[s]), len(keys[s])) for s in range(n_slots)
    ]


# --------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class ExampleConfig:
    """Per-sample processing: subsampling, augmentation, dtype shipped to the main process."""

    num_points: int = 2048
    rotate_up: bool = False
    scale_range: tuple[float, float] | None = None
    default_up_axis: str = "y"
    features_fp16: bool = False
    load_features: bool = True  # False: ship (P, 0) features and no patch targets (Stage 2 reads neither)


def track_shards(stats: StreamStats) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: note which shard WebDataset is about to open (for error attribution and de-duplication)."""

    def _stage(src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            stats.shard_serial += 1
            stats.current_url = item["url"]
            yield item

    return _stage


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url or url.startswith("pipe:") else url


SMALL_MEMBER = 1 << 16
"""Members smaller than this are copied to ``bytes`` (JSON needs bytes; tiny copies cost nothing)."""


def _read_local_tar(path: str, url: str) -> Iterator[dict]:
    """Members of one local tar as WebDataset file records; large members are zero-copy views.

    WebDataset's own reader parses the tar as a stream in 10 KiB records and joins them, several
    copies of every multi-megabyte feature member. Here headers are parsed by random-access
    ``tarfile`` and each large member is a ``memoryview`` into an ``mmap`` of the shard, so the
    decoder's ``np.frombuffer`` touches only the pages of the rows it gathers (about 2x faster
    end to end). The mapping lives as long as a view of it does, so closing the file early is safe.
    Shards are immutable once renamed into place; a shard truncated *in place* while being read
    would fault the worker, which is why the writer never rewrites one.

    It also catches what a stream reader cannot: a shard cut at a member boundary, or garbage where
    a header should be, ends ``tarfile``'s iteration silently, so the archive must end with its zero
    end-of-archive blocks or this raises.
    """
    with open(path, "rb", buffering=0) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        size = os.fstat(f.fileno()).st_size
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        for member in tar:
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            stop = member.offset_data + member.size
            if stop > size:
                raise tarfile.ReadError(
                    f"{url}: unexpected end of data in {member.name} ({stop} > {size} bytes)"
                )
            data = view[member.offset_data : stop]
            yield {
                "fname": member.name,
                "data": bytes(data) if member.size < SMALL_MEMBER else data,
                "__url__": url,
            }
        end = tar.offset
        tail = view[end : min(size, end + (1 << 20))]
        if len(tail) < 2 * tarfile.BLOCKSIZE or bytes(tail).count(0) != len(tail):
            raise tarfile.ReadError(
                f"{url}: truncated or corrupt after byte {end} of {size} (no clean end-of-archive marker)"
            )


def tar_files(handler: Callable[[Exception], bool]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: shard records ``{"url": ...}`` -> file records, local files via :func:`_read_local_tar`.

    Remote URLs (``s3://``, ``pipe:``...) go through WebDataset's opener and stream reader. Errors go
    to ``handler`` with WebDataset's protocol: return ``True`` to skip to the next shard.
    """

    def _stage(src: Iterable[dict]) -> Iterator[dict]:
        for source in src:
            url = source["url"]
            path = _local_path(url)
            if path is None:
                yield from wds.tariterators.tar_file_expander(
                    wds.tariterators.url_opener([dict(source)], handler=handler), handler=handler
                )
                continue
            try:
                yield from _read_local_tar(path, url)
            except Exception as exn:
                if handler(exn):
                    continue
                break
            yield {}  # end-of-shard marker: group_by_keys never merges samples across shards

    return _stage


def tar_samples(handler: Callable[[Exception], bool]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: shard records -> raw samples (members grouped by key), WebDataset's grouping and handler."""

    def _stage(src: Iterable[dict]) -> Iterator[dict]:
        return wds.tariterators.group_by_keys(tar_files(handler)(src), handler=handler)

    return _stage


def keep_keys(keys: frozenset[str] | None) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: drop raw samples whose ``__key__`` belongs to another slot (sample-level partition)."""

    def _stage(src: Iterable[dict]) -> Iterator[dict]:
        for raw in src:
            if keys is None or raw.get("__key__") in keys:
                yield raw

    return _stage


def decode_objects(
    stats: StreamStats, min_points: int, lookup: dict[str, int] | None
) -> Callable[[Iterable[dict]], Iterator[tuple[ObjectSample, np.ndarray]]]:
    """Stage: raw members -> (:class:`ObjectSample`, text-bank label ids); bad samples counted and skipped.

    Full validation except the all-rows feature scan (see ``ObjectSample.validate``); features are
    checked on the gathered rows in :func:`to_examples`.
    """

    def _stage(src: Iterable[dict]) -> Iterator[tuple[ObjectSample, np.ndarray]]:
        for raw in src:
            stats.attempt()
            where = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
            try:
                s = decode_sample(raw, min_points=min_points, check_features=False)
                if lookup is None:
                    ids = np.full(len(s.part_names), -1, dtype=np.int64)
                else:
                    unknown = [n for n in s.part_names if n not in lookup]
                    if unknown:
                        raise ShardFormatError(
                            f"part names {unknown} are not in the text bank", "unknown_part"
                        )
                    ids = np.fromiter(
                        (lookup[n] for n in s.part_names), dtype=np.int64, count=len(s.part_names)
                    )
            except ShardFormatError as e:
                stats.skip(e.reason, f"{where}: {e}")
                continue
            except (ValueError, TypeError, KeyError) as e:
                stats.skip("decode_error", f"{where}: {type(e).__name__}: {e}")
                continue
            yield s, ids

    return _stage


def rotation_about_axes(angles: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` right-handed rotations by ``angles`` about coordinate axes ``axes`` (0/1/2).

    Rodrigues' formula with a unit coordinate axis; ``points @ R.transpose(1, 2)`` rotates
    row-vector points. The one up-axis rotation of the data: the streaming path
    (:func:`rotate_about_axis`) and the decoded cache's batches both use it.
    """
    e = torch.nn.functional.one_hot(axes, 3).to(angles.dtype)  # (B, 3)
    c, s = angles.cos()[:, None, None], angles.sin()[:, None, None]
    cross = torch.zeros(angles.shape[0], 3, 3, dtype=angles.dtype, device=angles.device)
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -e[:, 2], e[:, 1], -e[:, 0]
    cross = cross - cross.transpose(1, 2)
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device)
    return c * eye + s * cross + (1 - c) * e[:, :, None] * e[:, None, :]


def rotate_about_axis(points: np.ndarray, angle: float, axis: int) -> np.ndarray:
    """Rotate ``(N, 3)`` points by ``angle`` radians about coordinate axis ``axis`` (right-handed)."""
    rot = rotation_about_axes(torch.tensor([angle], dtype=torch.float64), torch.tensor([axis]))[0]
    return (points @ rot.numpy().T).astype(points.dtype, copy=False)


def finite_fp16_row_max(uid: str, feats: np.ndarray) -> np.ndarray:
    """Largest ``|x|`` bit pattern per row of fp16 ``feats``; raises if any value is NaN/Inf.

    One pass over the fp16 bit patterns: the largest |x| per row (sign bit cleared) is >= 0x7C00
    exactly when the row has an Inf/NaN, and 0 exactly when the row is all zero (no teacher feature).
    ~10x cheaper than casting to float32 for np.isfinite. Unit norms were checked by the writer.
    """
    row_max = (feats.view(np.uint16) & np.uint16(0x7FFF)).max(axis=1)
    if (row_max >= 0x7C00).any():
        raise ShardFormatError(f"sample {uid!r}: features contain NaN/Inf", "non_finite")
    return row_max


def make_example(
    s: ObjectSample, label_ids: np.ndarray, cfg: ExampleConfig, rng: np.random.Generator, augment: bool
) -> Example:
    """Subsample to ``cfg.num_points`` (without replacement), check the gathered features, augment."""
    idx = rng.choice(s.num_points, cfg.num_points, replace=False)
    points = s.points[idx]
    if not cfg.load_features or s.features.shape[1] == 0:
        # Stage 2 (or a compact patch-target sample): skip the gather, checks, cast and transfer of
        # the widest array. Patch targets, if any, are small and travel separately.
        feats = np.zeros((cfg.num_points, 0), np.float16)
        feature_mask = np.ones(cfg.num_points, bool)
        return _finish_example(s, points, feats, feature_mask, label_ids, cfg, rng, augment, idx)
    feats = s.features[idx]
    feature_mask = finite_fp16_row_max(s.uid, feats) > 0
    return _finish_example(s, points, feats, feature_mask, label_ids, cfg, rng, augment, idx)


def _finish_example(
    s: ObjectSample,
    points: np.ndarray,
    feats: np.ndarray,
    feature_mask: np.ndarray,
    label_ids: np.ndarray,
    cfg: ExampleConfig,
    rng: np.random.Generator,
    augment: bool,
    idx: np.ndarray,
) -> Example:
    """Augment the subsampled points (and the stored patch centres, identically); assemble the example."""
    centers = s.patch_centers if (cfg.load_features and s.patch_centers is not None) else None
    if centers is not None and augment and (cfg.rotate_up or cfg.scale_range is not None):
        both = _augment(s, np.concatenate([points, centers]), cfg, rng)
        points, centers = both[: points.shape[0]], both[points.shape[0] :]
    elif augment:
        points = _augment(s, points, cfg, rng)
    ex = {
        "points": np.ascontiguousarray(points, dtype=np.float32),
        "features": feats,  # fp16; cast (if asked) while collating, straight into the batch buffer
        "feature_mask": feature_mask,
        "membership": s.membership[idx],
        "label_ids": label_ids,
        "uid": s.uid,
        "category": str(s.meta.get("category", "")),
        "valid": True,
    }
    if centers is not None:
        ex["patch_centers"] = np.ascontiguousarray(centers, dtype=np.float32)
        ex["patch_features"] = s.patch_features
    return ex


def up_axis_index(s: ObjectSample, cfg: ExampleConfig) -> int:
    """The sample's up axis (meta ``up_axis``, else ``cfg.default_up_axis``) as 0/1/2 for x/y/z."""
    up = str(s.meta.get("up_axis", cfg.default_up_axis)).lower()[-1:]
    if up not in _AXIS:
        raise ShardFormatError(
            f"sample {s.uid!r}: meta up_axis {s.meta.get('up_axis')!r} is not x/y/z", "bad_meta"
        )
    return _AXIS[up]


def _augment(s: ObjectSample, points: np.ndarray, cfg: ExampleConfig, rng: np.random.Generator) -> np.ndarray:
    """Random rotation about the shape's up axis, then a random isotropic scale (as configured)."""
    if cfg.rotate_up:
        points = rotate_about_axis(points, rng.uniform(0.0, 2.0 * math.pi), up_axis_index(s, cfg))
    if cfg.scale_range is not None:
        points = points * np.float32(rng.uniform(*cfg.scale_range))
    return points


def counted_map(
    stats: StreamStats, fn: Callable[[ObjectSample, np.ndarray], Any]
) -> Callable[[Iterable[tuple[ObjectSample, np.ndarray]]], Iterator[Any]]:
    """Stage: ``fn(sample, label_ids)`` per decoded object; a :class:`ShardFormatError` is a counted
    skip (its ``reason``), anything else is ``ok``. The one place after decoding where objects are
    skipped: the streaming examples and the decoded cache's objects both go through it."""

    def _stage(src: Iterable[tuple[ObjectSample, np.ndarray]]) -> Iterator[Any]:
        for s, ids in src:
            try:
                out = fn(s, ids)
            except ShardFormatError as e:
                stats.skip(e.reason, str(e))
                continue
            stats.ok()
            yield out

    return _stage


def to_examples(
    cfg: ExampleConfig, stats: StreamStats, rng: np.random.Generator | None, seed: int, augment: bool
) -> Callable[[Iterable[tuple[ObjectSample, np.ndarray]]], Iterator[Example]]:
    """Stage: objects -> fixed-size examples.

    ``rng`` given: one stream-wide generator (training; seeded per rank/worker/epoch). ``rng=None``:
    a generator per object seeded by ``(seed, uid)`` so validation picks the same points every pass
    regardless of which worker or rank reads the object.
    """

    def example(s: ObjectSample, ids: np.ndarray) -> Example:
        r = rng if rng is not None else np.random.default_rng(stable_seed(seed, s.uid))
        return make_example(s, ids, cfg, r, augment)

    return counted_map(stats, example)


def pad_example(num_points: int, feature_dim: int) -> Example:
    """A placeholder example (``valid=False``) used to give every validation slot the same batch count.

    Points are a fixed random cloud (not all-zero, so FPS/kNN stay well defined); features are zero
    and masked out; it has no parts.
    """
    g = np.random.default_rng(0)
    p = g.standard_normal((num_points, 3)).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return {
        "points": p,
        "features": np.zeros((num_points, feature_dim), np.float16),
        "feature_mask": np.zeros(num_points, bool),
        "membership": np.zeros((num_points, 0), bool),
        "label_ids": np.zeros(0, np.int64),
        "uid": "",
        "category": "",
        "valid": False,
    }


def pad_to_count(
    total: int, make_pad: Callable[[], Example]
) -> Callable[[Iterable[Example]], Iterator[Example]]:
    """Stage: emit exactly ``total`` examples, padding with placeholders (validation batch-count parity)."""

    def _stage(src: Iterable[Example]) -> Iterator[Example]:
        n = 0
        for ex in src:
            n += 1
            if n > total:
                raise DataQualityError(
                    f"validation slot read more than the {total} samples its manifest lists; "
                    "the manifest is stale, rebuild it"
                )
            yield ex
        if n < total:
            pad = make_pad()
            for _ in range(total - n):
                yield pad

    return _stage


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised tensor; inside a loader worker it is allocated in shared memory.

    A worker's batch crosses to the main process through shared memory; a tensor that is already
    there is passed by handle, otherwise PyTorch copies it over (the same trick ``default_collate``
    uses). At 8 x 2048 x 768 float32 features that saves a 50 MB copy per batch.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype).untyped_storage()._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate_examples(examples: list[Example], features_dtype: torch.dtype = torch.float32) -> Batch:
    """Stack examples into a batch, padding the part axis to the batch's largest ``L`` (min 1).

    Features are cast from fp16 while being copied into the batch buffer: one pass per shape.
    """
    b = len(examples)
    p, c = examples[0]["features"].shape
    l_max = max(1, max(ex["label_ids"].shape[0] for ex in examples))
    points = _batch_buffer((b, p, 3), torch.float32)
    features = _batch_buffer((b, p, c), features_dtype)
    membership = _batch_buffer((b, p, l_max), torch.float32)
    points_np, features_np, membership_np = points.numpy(), features.numpy(), membership.numpy()
    membership_np[...] = 0
    label_ids = np.full((b, l_max), -1, np.int64)
    for i, ex in enumerate(examples):  # loop over the B shapes only, each a block copy
        n_l = ex["label_ids"].shape[0]
        points_np[i] = ex["points"]
        features_np[i] = ex["features"]
        membership_np[i, :, :n_l] = ex["membership"]
        label_ids[i, :n_l] = ex["label_ids"]
    label_mask = np.zeros((b, l_max), bool)
    label_mask[:, :] = (
        np.arange(l_max)[None, :] < np.array([ex["label_ids"].shape[0] for ex in examples])[:, None]
    )
    batch = {
        "points": points,
        "features": features,
        "feature_mask": torch.from_numpy(np.stack([ex["feature_mask"] for ex in examples])),
        "membership": membership,
        "label_ids": torch.from_numpy(label_ids),
        "label_mask": torch.from_numpy(label_mask),
        "valid": torch.tensor([ex["valid"] for ex in examples]),
        "uid": [ex["uid"] for ex in examples],
        "category": [ex["category"] for ex in examples],
    }
    with_patches = [ex for ex in examples if "patch_centers" in ex]
    if with_patches:
        batch.update(_collate_patches(examples, with_patches, features_dtype))
    return batch


def _collate_patches(
    examples: list[Example], with_patches: list[Example], features_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``patch_centers (B, G0, 3)`` and ``patch_features (B, G0, C)``; shapes with fewer stored
    patches (or validation pads, which have none) get NaN centres, which are never matched."""
    if any(ex["valid"] and "patch_centers" not in ex for ex in examples):
        raise ShardFormatError("a batch mixes samples with and without patch targets", "mixed_targets")
    b = len(examples)
    g0 = max(ex["patch_centers"].shape[0] for ex in with_patches)
    c = with_patches[0]["patch_features"].shape[1]
    centers = _batch_buffer((b, g0, 3), torch.float32)
    feats = _batch_buffer((b, g0, c), features_dtype)
    centers_np, feats_np = centers.numpy(), feats.numpy()
    centers_np[...] = np.nan
    feats_np[...] = 0
    for i, ex in enumerate(examples):
        if "patch_centers" in ex:
            n = ex["patch_centers"].shape[0]
            centers_np[i, :n] = ex["patch_centers"]
            feats_np[i, :n] = ex["patch_features"]
    return {"patch_centers": centers, "patch_features": feats}


def batch_examples(
    batch_size: int, stats: StreamStats, partial: bool, features_fp16: bool = False
) -> Callable[[Iterable[Example]], Iterator[Batch]]:
    """Stage: group examples into batches and attach the worker's skip-count delta under ``_stats``."""

    dtype = torch.float16 if features_fp16 else torch.float32

    def _stage(src: Iterable[Example]) -> Iterator[Batch]:
        buf: list[Example] = []
        for ex in src:
            buf.append(ex)
            if len(buf) == batch_size:
                batch = collate_examples(buf, dtype)
                batch[STATS_KEY] = stats.take_delta()
                yield batch
                buf = []
        if buf and partial:
            batch = collate_examples(buf, dtype)
            batch[STATS_KEY] = stats.take_delta()
            yield batch

    return _stage


# --------------------------------------------------------------------------------------- pipelines
@dataclass(frozen=True)
class StreamContext:
    """Where a pipeline instance runs: rank, loader worker, epoch and base seed."""

    rank: int
    world_size: int
    worker: int
    num_workers: int
    epoch: int
    seed: int

    def seed_for(self, purpose: str) -> int:
        return stable_seed(self.seed, purpose, self.epoch, self.rank, self.worker)


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """Worker ``worker``'s share when ``total`` items are dealt round-robin (shares sum to ``total``)."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


@dataclass(frozen=True)
class TrainSpec:
    plan: SlotPlan
    batch_size: int
    batches_per_epoch: int
    shuffle_buffer: int
    example: ExampleConfig
    lookup: dict[str, int] | None


def build_train_pipeline(ctx: StreamContext, spec: TrainSpec, stats: StreamStats) -> Iterable[Batch]:
    """Infinite, resampled, shuffled stream of this rank's shards, cut to this worker's batch share.

    ``with_epoch`` makes the per-rank batch count a constant (the workers' shares sum to
    ``batches_per_epoch``) independent of how many samples each rank's shards hold.
    """
    stages: list[Any] = [
        wds.ResampledShards(spec.plan.urls, worker_seed=lambda: ctx.seed_for("shards"), deterministic=True),
        track_shards(stats),
        tar_samples(stats.tar_handler),
        keep_keys(spec.plan.keys),
        decode_objects(stats, spec.example.num_points, spec.lookup),
        to_examples(
            spec.example, stats, np.random.default_rng(ctx.seed_for("points")), ctx.seed, augment=True
        ),
    ]
    if spec.shuffle_buffer > 1:
        stages.append(
            wds.shuffle(
                spec.shuffle_buffer,
                initial=spec.shuffle_buffer,
                rng=random.Random(ctx.seed_for("shuffle")),
            )
        )
    stages.append(
        batch_examples(spec.batch_size, stats, partial=False, features_fp16=spec.example.features_fp16)
    )
    n = worker_share(spec.batches_per_epoch, ctx.worker, ctx.num_workers)
    if n == 0:  # more workers than batches: this one has nothing to do (with_epoch(0) means "no limit")
        return []
    return wds.DataPipeline(*stages).with_epoch(n)


@dataclass(frozen=True)
class ValSpec:
    plans: list[SlotPlan]  # one per (rank, worker) slot, slot = rank * num_workers + worker
    batch_size: int
    batches_per_slot: int
    feature_dim: int
    example: ExampleConfig
    lookup: dict[str, int] | None


def build_val_pipeline(ctx: StreamContext, spec: ValSpec, stats: StreamStats) -> wds.DataPipeline:
    """Deterministic pass over this slot's samples, padded to exactly ``batches_per_slot`` batches."""
    slot = ctx.rank * ctx.num_workers + ctx.worker
    plan = spec.plans[slot]
    ex = spec.example
    return wds.DataPipeline(
        wds.SimpleShardList(plan.urls) if plan.urls else _empty_source(),
        track_shards(stats),
        tar_samples(stats.tar_handler),
        keep_keys(plan.keys),
        decode_objects(stats, ex.num_points, spec.lookup),
        to_examples(ex, stats, None, ctx.seed, augment=False),
        pad_to_count(
            spec.batches_per_slot * spec.batch_size,
            lambda: pad_example(ex.num_points, spec.feature_dim),
        ),
        batch_examples(spec.batch_size, stats, partial=False, features_fp16=ex.features_fp16),
    )


def _empty_source() -> Iterator[dict]:
    return iter(())


@dataclass(eq=False)  # eq=False: compared and hashed by identity, like any Dataset
class ShardStream(torch.utils.data.IterableDataset):
    """IterableDataset that builds a fresh pipeline per iteration from the worker's context.

    Rank and world size are fixed at construction (from the Trainer); the loader worker is read
    from ``torch.utils.data.get_worker_info()`` at iteration time. ``epoch`` is set by
    :class:`StreamLoader` before each pass, so a pass is a pure function of (seed, epoch, rank,
    worker). Persistent workers keep the copy of the dataset they started with and never see later
    ``epoch`` values, so there the local pass count is added instead.
    """

    split: str
    build: Callable[[StreamContext, Any, StreamStats], Iterable[Batch]]
    spec: TrainSpec | ValSpec
    rank: int
    world_size: int
    seed: int
    length: int
    epoch: int = field(default=0, init=False)
    skip_batches: int = field(default=0, init=False)  # batches of this pass consumed before a resume (rank)
    persistent_workers: bool = field(default=False, init=False)
    _iters: int = field(default=0, init=False, repr=False)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch + (self._iters if self.persistent_workers and info is not None else 0)
        ctx = StreamContext(self.rank, self.world_size, worker, num_workers, epoch, self.seed)
        self._iters += 1
        stats = StreamStats(split=self.split)
        it = iter(self.build(ctx, self.spec, stats))
        if self.skip_batches:
            # Resuming mid-epoch: the pass is a pure function of (seed, epoch, rank, worker), so dropping
            # the batches this worker produced before the interruption continues the same stream. The
            # loader deals batches round-robin over workers, hence this worker's share of the skip.
            it = itertools.islice(it, worker_share(self.skip_batches, worker, num_workers), None)
        return it


class StreamLoader(torch.utils.data.DataLoader):
    """DataLoader over a :class:`ShardStream` that strips skip-count deltas off batches into a counter.

    Doing the aggregation here (main process) rather than in Lightning hooks means counts are exact
    for any ``num_workers`` and also when the loader is used outside a Trainer.
    """

    def __init__(
        self,
        dataset: ShardStream,
        counter: SkipCounter,
        epoch_fn: Callable[[], int] | None = None,
        position_fn: Callable[[], tuple[int, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        # Worker base seeds come from a private generator, not the global torch RNG: every pass is
        # already seeded from (seed, epoch, rank, worker), and drawing from the global RNG at each
        # iter() would shift the model's random stream (drop-path) between an interrupted-and-resumed
        # run and an uninterrupted one.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, batch_size=None, **kwargs)
        dataset.persistent_workers = bool(kwargs.get("persistent_workers")) and self.num_workers > 0
        self.counter = counter
        self.epoch_fn = epoch_fn
        self.position_fn = position_fn
        self._passes = 0

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        self.dataset.epoch = self.epoch_fn() if self.epoch_fn is not None else self._passes
        self.dataset.skip_batches = 0
        if self.position_fn is not None:  # (epoch, batches already done in it), e.g. after a resume
            self.dataset.epoch, self.dataset.skip_batches = self.position_fn()
        self._passes += 1
        return self._strip(super().__iter__())

    def _strip(self, it: Iterator[Batch]) -> Iterator[Batch]:
        for batch in it:
            delta = batch.pop(STATS_KEY, None)
            if delta:
                self.counter.update(delta)
                self.counter.check()
            yield batch
        self.counter.check(final=True)
