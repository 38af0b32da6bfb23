"""Lightning data module over the benchmark readers, for ``patchalign test/validate/predict``.

Batches are :func:`~patchalign.eval.protocol.collate_part_samples` dicts: ``points (B, N, 3)``,
``labels (B, N)``, ``index (B,)`` and the lists ``uid``, ``category``, ``part_names``. The module
exposes ``categories`` / ``part_names_by_category`` / ``test_dataset`` for
:class:`~patchalign.eval.module.ZeroShotSegmentation` to build its
:class:`~patchalign.eval.evaluator.PartSegEvaluator` and text embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from patchalign.eval.protocol import ResampledDataset, collate_part_samples
from patchalign.eval.readers import DatasetKind, PartSegDataset, build_dataset
from patchalign.eval.references import get_reference, reference_key_for


class UnrepeatedShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets shapes ``r, r + w, r + 2w, ...``: every shape exactly once.

    Lightning's default ``DistributedSampler`` pads the dataset so all ranks get equal counts, which
    evaluates a few shapes twice and biases the metric; run evaluation with
    ``Trainer(use_distributed_sampler=False)`` so this sampler is kept.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _shard_sampler(length: int) -> Sampler[int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            return UnrepeatedShardSampler(length, torch.distributed.get_rank(), world)
    return None


class EvalDataModule(L.LightningDataModule):
    """One benchmark split, normalised and sampled with the seeded evaluation protocol.

    Args:
        dataset: reader kind (``shapenetpart``, ``shapenetpart_h5``, ``partnete``, ``faust``,
            ``scanobjectnn``, ``scanobjectnn_h5``, ``objaverse``).
        root: the benchmark's root directory (see each reader).
        split: split name (ShapeNetPart ``test``/``val``/...; Objaverse
            ``seenclass``/``unseen``/``shapenetpart``).
        num_points: points per shape after seeded sampling (2048 in all papers compared).
        seed: sampling seed; each shape's points depend only on ``(seed, uid)``.
        batch_size: shapes per batch.
        num_workers: DataLoader worker processes.
        categories: restrict to these categories (default: all).
        part_names: ShapeNetPart vocabulary: ``patchalign3d`` (released) or ``find3d``.
        replace: sample with replacement as Point-BERT does (``False``: distinct points when possible).
        reader_args: reader-specific keyword arguments, e.g. ``{granularity: coarse}`` (FAUST),
            ``{meta_path: ...}`` (PartNetE), ``{variant: main_split}`` (ScanObjectNN h5).
        benchmark: the talk row the run is printed beside
            (:data:`~patchalign.eval.references.TALK_REFERENCES` key); ``"auto"`` picks it from
            ``dataset`` and ``split`` (none for splits the talk does not report), ``null`` for none.
    """

    def __init__(
        self,
        dataset: DatasetKind = "shapenetpart",
        root: str = "",
        split: str = "test",
        num_points: int = 2048,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 4,
        categories: list[str] | None = None,
        part_names: str = "patchalign3d",
        replace: bool = True,
        reader_args: dict[str, Any] | None = None,
        benchmark: str | None = "auto",
    ) -> None:
        super().__init__()
        # Checked here, in one line each: jsonargparse would bury a failure inside __init__ under
        # "Does not validate against any of the Union subtypes".
        if dataset not in get_args(DatasetKind):
            raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(get_args(DatasetKind))}")
        if not root:
            raise ValueError("EvalDataModule needs root= (the benchmark directory)")
        if not Path(root).exists():  # checked here, not in setup: one line before any model is built
            raise FileNotFoundError(f"benchmark root {root}: no such file or directory")
        if benchmark == "auto":
            benchmark = reference_key_for(dataset, split)
        elif benchmark is not None:
            get_reference(benchmark)
        self.save_hyperparameters()
        self.kind = dataset
        self.root = root
        self.split = split
        self.num_points = num_points
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.categories_filter: Sequence[str] | None = categories
        self.part_names = part_names
        self.replace = replace
        self.reader_args = dict(reader_args or {})
        self.benchmark = benchmark
        self._dataset: ResampledDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._dataset is None:
            reader = build_dataset(
                self.kind, self.root, self.split, self.categories_filter, self.part_names, **self.reader_args
            )
            if len(reader) == 0:
                raise ValueError(
                    f"{reader.name} at {self.root} (split {self.split!r}) has no shapes to evaluate "
                    f"({reader.num_missing} listed shapes are missing)"
                )
            self._dataset = ResampledDataset(reader, self.num_points, self.seed, replace=self.replace)
            self._dataset.benchmark = self.benchmark  # read by PartSegEvaluator.from_dataset

    @property
    def test_dataset(self) -> ResampledDataset:
        if self._dataset is None:
            self.setup("test")
        assert self._dataset is not None
        return self._dataset

    @property
    def reader(self) -> PartSegDataset:
        return self.test_dataset.dataset

    @property
    def categories(self) -> list[str]:
        return list(self.reader.categories)

    @property
    def part_names_by_category(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.reader.part_names_by_category.items()}

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.test_dataset,
            batch_size=self.batch_size,
            sampler=_shard_sampler(len(self.test_dataset)),
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_part_samples,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
