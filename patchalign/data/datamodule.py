"""``ShardDataModule``: streams patchalign shards into fixed-size training and validation batches.

Thin Lightning wrapper over :mod:`patchalign.data.pipeline`. What it adds is the wiring that needs
the Trainer: rank and world size come from ``self.trainer`` in :meth:`ShardDataModule.setup` (not
from environment variables, which differ between Slurm, torchrun and spawn), the shard partition is
computed from the manifest identically on every rank, and the epoch number seeds the resampling.

Batch layout (one dict per step; ``B`` shapes, ``P = num_points``, ``C`` teacher width,
``L`` = most parts of any shape in the batch)::

    points        (B, P, 3) float32
    features      (B, P, C) float32   per-point teacher features (patch targets are pooled in the model)
    feature_mask  (B, P)    bool      False where the point has no teacher feature
    membership    (B, P, L) float32   point-in-part, zero padded
    label_ids     (B, L)    int64     text-bank rows of the shape's part names, -1 padded
    label_mask    (B, L)    bool
    valid         (B,)      bool      False for validation padding (exclude from metrics)
    uid, category           list[str]
    patch_centers  (B, G0, 3) float32  only for shard sets with patch targets: stored centres,
    patch_features (B, G0, C)          rotated/scaled exactly like ``points`` (NaN rows = padding)

``features`` is ``(B, P, 0)`` for compact (patch-target) sets and with ``load_features: false``.

Two training paths, selected by ``cache``: ``"off"`` streams WebDataset shards every epoch
(:mod:`.pipeline`; for data that does not fit in memory); ``"host"`` / ``"device"`` decode this
rank's samples once into memory and build every batch with batched torch ops (:mod:`.cache`).
Both keep the per-rank partition, equal batches per rank, exact resume and skip counting.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from patchalign.data.cache import CachedTrainLoader, DecodedCache, build_cache
from patchalign.data.pipeline import (
    ExampleConfig,
    ShardStream,
    SkipCounter,
    StreamLoader,
    TrainSpec,
    ValSpec,
    build_train_pipeline,
    build_val_pipeline,
    partition_samples,
)
from patchalign.data.textbank import TextBank, load_text_bank
from patchalign.data.writer import Manifest, ShardInfo, read_manifest

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Streaming data module over a shard set written by :class:`~patchalign.data.writer.ShardSetWriter`.

    Args:
        data_path: shard directory or its ``manifest.json``.
        batch_size: shapes per training batch (per rank).
        num_workers: training loader workers per rank.
        num_points: points per shape after random subsampling (shapes with fewer are skipped).
        shuffle_buffer: examples held for shuffling per worker. Memory: about
            ``num_points x C x 2`` bytes each (3 MB at 2048 x 768), hence the modest default.
        batches_per_epoch: training batches per rank per epoch. ``None``: one expected pass over
            the training samples, ``ceil(n_train / (batch_size x world_size))``. Fixed per rank
            whatever the shard sizes, so DDP ranks never wait on each other.
        val_path: separate validation shard set (directory or manifest).
        num_val_shards: alternatively hold out the last ``k`` shards of ``data_path`` for validation.
        val_batch_size: defaults to ``batch_size``.
        val_num_workers: defaults to ``num_workers``.
        text_bank: text bank file; defaults to the one named in the manifest. Without any bank,
            ``label_ids`` are -1 (Stage 1 needs no labels) and part names are not checked.
        rotate_up: augment training shapes with a uniform random rotation about their up axis.
        scale_range: augment training shapes with a uniform random isotropic scale in this range.
        up_axis: up axis for shapes whose ``meta`` has no ``up_axis``.
        max_skip_fraction: fail the run when more than this fraction of samples was skipped.
        seed: base seed; each rank/worker/epoch derives its own.
        pin_memory: pin batches for faster host-to-device copies.
        persistent_workers: keep loader workers alive between epochs.
        features_fp16_transfer: ship ``features`` as float16 from the workers and convert to
            float32 on the device in :meth:`on_after_batch_transfer` (halves inter-process and
            host-to-device bytes at large ``C``). If your LightningModule overrides
            ``on_after_batch_transfer`` it takes precedence, so convert there yourself.
        load_features: ``False`` ships ``features`` of width 0 and no patch targets: Stage 2 never
            reads the teacher features, which are most of each sample's bytes, so it skips
            gathering, checking, casting and transferring them.
        cache: ``"off"`` streams the shards every epoch; ``"host"`` decodes this rank's training
            samples once (in ``num_workers`` workers) into host memory; ``"device"`` keeps that cache
            on the training device. Batches are then built by batched torch ops with no loader
            workers. Meant for compact (patch-target) shards: ~270 KB per Find3D object.
        cache_points: points kept per object in the cache (default: the smallest stored ``N``).
        cache_max_gb: refuse to build a cache larger than this (per rank), with a message.
    """

    def __init__(
        self,
        data_path: str,
        batch_size: int = 32,
        num_workers: int = 4,
        num_points: int = 2048,
        shuffle_buffer: int = 128,
        batches_per_epoch: int | None = None,
        val_path: str | None = None,
        num_val_shards: int = 0,
        val_batch_size: int | None = None,
        val_num_workers: int | None = None,
        text_bank: str | None = None,
        rotate_up: bool = False,
        scale_range: tuple[float, float] | None = None,
        up_axis: str = "y",
        max_skip_fraction: float = 0.05,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        features_fp16_transfer: bool = False,
        load_features: bool = True,
        cache: Literal["off", "host", "device"] = "off",
        cache_points: int | None = None,
        cache_max_gb: float | None = 64.0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_points < 1:
            raise ValueError("batch_size and num_points must be positive")
        if up_axis not in ("x", "y", "z"):
            raise ValueError(f"up_axis must be x, y or z, got {up_axis!r}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError("max_skip_fraction must be in [0, 1]")
        if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range}")
        if cache not in ("off", "host", "device"):
            raise ValueError(f"cache must be 'off', 'host' or 'device', got {cache!r}")
        if cache_points is not None and cache_points < num_points:
            raise ValueError(f"cache_points={cache_points} is below num_points={num_points}")
        self.save_hyperparameters()
        self.data_path = data_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_points = num_points
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.val_path = val_path
        self.num_val_shards = num_val_shards
        self.val_batch_size = val_batch_size or batch_size
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.text_bank_path = text_bank
        self.max_skip_fraction = max_skip_fraction
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.features_fp16_transfer = features_fp16_transfer
        self.example_config = ExampleConfig(
            num_points=num_points,
            rotate_up=rotate_up,
            scale_range=tuple(scale_range) if scale_range is not None else None,
            default_up_axis=up_axis,
            features_fp16=features_fp16_transfer,
            load_features=load_features,
        )
        self.load_features = load_features
        self.cache = cache
        self.cache_points = cache_points
        self.cache_max_gb = cache_max_gb
        self._decoded: DecodedCache | None = None
        self.rank = 0
        self.world_size = 1
        self.manifest: Manifest | None = None
        self.text_bank: TextBank | None = None
        self._train: tuple[list[ShardInfo], list[str]] | None = None
        self._val: tuple[list[ShardInfo], list[str]] | None = None
        self.counters = {
            "train": SkipCounter("train", max_skip_fraction),
            "val": SkipCounter("val", max_skip_fraction),
        }

    # ------------------------------------------------------------------------------------- setup
    def set_distributed(self, rank: int, world_size: int) -> None:
        """Set rank/world size by hand (benchmarks, tests, or use outside a Trainer)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.rank, self.world_size = rank, world_size

    def setup(self, stage: str | None = None) -> None:
        """Read manifests and the text bank; take rank/world size from the attached Trainer."""
        if self.trainer is not None:
            self.set_distributed(self.trainer.global_rank, self.trainer.world_size)
        self.manifest = read_manifest(self.data_path)
        shards, urls = list(self.manifest.shards), self.manifest.shard_urls()
        if self.val_path is not None:
            vm = read_manifest(self.val_path)
            self._val = (list(vm.shards), vm.shard_urls())
            if vm.feature_dim != self.manifest.feature_dim:
                raise ValueError(
                    f"val feature_dim {vm.feature_dim} != train feature_dim {self.manifest.feature_dim}"
                )
        elif self.num_val_shards > 0:
            if self.num_val_shards >= len(shards):
                raise ValueError(
                    f"num_val_shards={self.num_val_shards} leaves no training shard of {len(shards)}"
                )
            k = self.num_val_shards
            self._val = (shards[-k:], urls[-k:])
            shards, urls = shards[:-k], urls[:-k]
        self._train = (shards, urls)
        bank_path = self.text_bank_path or self.manifest.text_bank_path()
        if bank_path is not None:
            self.text_bank = load_text_bank(bank_path)
            missing = [n for n in self.manifest.vocabulary if n not in self.text_bank]
            if missing:
                log.warning(
                    "%d part names of %s are not in the text bank %s (their shapes will be skipped): %s",
                    len(missing),
                    self.data_path,
                    bank_path,
                    missing[:10],
                )
        else:
            log.info("no text bank for %s: label_ids will be -1 (fine for Stage 1)", self.data_path)

    @property
    def feature_dim(self) -> int:
        self._require_setup()
        return int(self.manifest.feature_dim or 0)

    def _per_point_features(self) -> bool:
        """Whether the training set stores per-point features (compact sets store only patch targets)."""
        targets = self.manifest.targets
        return targets is None or "points" in targets

    def _require_setup(self) -> None:
        if self.manifest is None:
            raise RuntimeError("call setup() first (the Trainer does this)")

    def _lookup(self) -> dict[str, int] | None:
        return None if self.text_bank is None else dict(self.text_bank.lookup)

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def train_batches_per_epoch(self) -> int:
        """Per-rank training batches per epoch (explicit, or one expected pass over the data)."""
        self._require_setup()
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        n = sum(s.n_samples for s in self._train[0])
        return max(1, math.ceil(n / (self.batch_size * self.world_size)))

    # ------------------------------------------------------------------------------------- loaders
    def _loader_kwargs(self, num_workers: int) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "num_workers": num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
        }
        if num_workers > 0:
            kw["persistent_workers"] = self.persistent_workers
        return kw

    def train_dataloader(self) -> StreamLoader | CachedTrainLoader:
        self._require_setup()
        shards, urls = self._train
        n_samples = sum(s.n_samples for s in shards)
        if n_samples < self.world_size:
            raise ValueError(f"{n_samples} training samples cannot be split over {self.world_size} ranks")
        plan = partition_samples(shards, urls, self.world_size)[self.rank]
        n_batches = self.train_batches_per_epoch()
        if self.cache != "off":
            return CachedTrainLoader(
                self.decoded_cache(plan),
                self.batch_size,
                n_batches,
                self.example_config,
                self.seed,
                self.rank,
                self.counters["train"],
                epoch_fn=self._epoch,
                position_fn=self._train_position if self.trainer is not None else None,
            )
        spec = TrainSpec(
            plan=plan,
            batch_size=self.batch_size,
            batches_per_epoch=n_batches,
            shuffle_buffer=self.shuffle_buffer,
            example=self.example_config,
            lookup=self._lookup(),
        )
        dataset = ShardStream(
            "train", build_train_pipeline, spec, self.rank, self.world_size, self.seed, n_batches
        )
        return StreamLoader(
            dataset,
            self.counters["train"],
            epoch_fn=self._epoch,
            position_fn=self._train_position if self.trainer is not None else None,
            **self._loader_kwargs(self.num_workers),
        )

    def _cache_device(self) -> torch.device:
        if self.cache == "host":
            return torch.device("cpu")
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def decoded_cache(self, plan: Any = None) -> DecodedCache:
        """This rank's decoded training cache, built on first use (one pass over its shards)."""
        if self._decoded is None:
            self._require_setup()
            if plan is None:
                plan = partition_samples(*self._train, self.world_size)[self.rank]
            max_bytes = None if self.cache_max_gb is None else int(self.cache_max_gb * 1e9)
            cache = build_cache(
                plan,
                self.example_config,
                self._lookup(),
                self.counters["train"],
                num_workers=self.num_workers,
                cache_points=self.cache_points,
                seed=self.seed,
                max_bytes=max_bytes,
            )
            log.info(
                "rank %d: decoded cache of %d objects, %.2f GB, %d points each",
                self.rank,
                len(cache),
                cache.nbytes / 1e9,
                cache.points.shape[1],
            )
            self._decoded = cache.to(self._cache_device())
        return self._decoded

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches already consumed in it) of the stream to produce next.

        On a fresh epoch that is ``(current_epoch, 0)``. Right after a checkpoint restore (Slurm
        requeue, ``--ckpt_path last``) Lightning's restored loop progress says how many batches of the
        interrupted epoch the model already trained on; the loader skips exactly those, so the resumed
        run sees the same batches in the same order as an uninterrupted one.
        """
        trainer = self.trainer
        epoch = int(trainer.current_epoch)
        fit_loop = trainer.fit_loop
        if not fit_loop.restarting:
            return epoch, 0
        done = int(fit_loop.epoch_loop.batch_progress.current.processed)
        n = self.train_batches_per_epoch()
        if done >= n:  # checkpoint taken at the very end of an epoch: the next one starts afresh
            return epoch + 1, 0
        return epoch, done

    def val_dataloader(self) -> StreamLoader | list:
        self._require_setup()
        if self._val is None:
            return []
        shards, urls = self._val
        workers = max(1, self.val_num_workers)
        plans = partition_samples(shards, urls, self.world_size * workers)
        max_load = max(p.n_samples for p in plans)
        batches_per_slot = max(1, math.ceil(max_load / self.val_batch_size))
        spec = ValSpec(
            plans=plans,
            batch_size=self.val_batch_size,
            batches_per_slot=batches_per_slot,
            feature_dim=self.feature_dim if self.load_features and self._per_point_features() else 0,
            example=self.example_config,
            lookup=self._lookup(),
        )
        dataset = ShardStream(
            "val", build_val_pipeline, spec, self.rank, self.world_size, self.seed, batches_per_slot * workers
        )
        # The slot layout assumes exactly `workers` loader workers (0 workers == 1 slot per rank).
        return StreamLoader(dataset, self.counters["val"], **self._loader_kwargs(self.val_num_workers))

    # ------------------------------------------------------------------------------------- hooks
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Convert fp16-shipped features to float32 on the device (see ``features_fp16_transfer``)."""
        if isinstance(batch, dict):
            for key in ("features", "patch_features"):
                if isinstance(batch.get(key), Tensor):
                    batch[key] = batch[key].float()
        return batch

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Samples seen/skipped (by reason) on this rank, per split, summed over loader workers."""
        return {split: c.as_dict() for split, c in self.counters.items()}

    def skip_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """:meth:`skip_counts` flattened to ``data/<split>/<reason>`` floats, for ``log_dict``.

        These are this rank's counts: the training modules log them per rank (``sync_dist=False``,
        so logging costs no collective every step); the per-rank sums are what each rank checks
        against ``max_skip_fraction``.
        """
        return {
            f"{prefix}{split}/{k}": float(v)
            for split, counts in self.skip_counts().items()
            for k, v in counts.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"skip_counts": self.skip_counts()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for split, counts in state_dict.get("skip_counts", {}).items():
            if split in self.counters:
                c = self.counters[split]
                c.seen = counts.get("seen", 0)
                c.skipped.clear()
                c.skipped.update({k: v for k, v in counts.items() if k not in ("seen", "skipped")})


__all__ = ["ShardDataModule"]
