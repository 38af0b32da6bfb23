"""The work dir of a build: one ``.npz`` per object and stage, the object list, failures, settings.

Layout (``WORK/``)::

    objects.jsonl          the object list (:mod:`patchalign.engine.records`)
    config.json            the cache-relevant settings the caches were made with
    teacher.json           the teacher that made the features (spec resolved: real or random)
    failures.jsonl         one line per failed object and stage
    <stage>/<key>.npz      per-object caches: points, render, features, pointfeat, labels

Every file is written through :func:`patchalign.atomic.atomic_path`, so a file that exists is
complete: that is what makes every stage resumable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from patchalign.atomic import atomic_path, write_bytes_atomic
from patchalign.engine.config import EngineConfig
from patchalign.engine.records import ObjectRecord

__all__ = ["WorkDir", "load_npz", "save_npz"]

#: The per-object cache directories, in stage order (``pointfeat`` is written by backproject / views).
CACHE_STAGES = ("points", "render", "features", "pointfeat", "labels")


def save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez`` through a temp file: the final name only ever holds a complete file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class WorkDir:
    """Per-object cache files of every stage, the object list, the failure log and the config."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def records_path(self) -> Path:
        return self.root / "objects.jsonl"

    @property
    def failures_path(self) -> Path:
        return self.root / "failures.jsonl"

    def path(self, stage: str, record: ObjectRecord) -> Path:
        return self.root / stage / f"{record.key}.npz"

    def has(self, stage: str, record: ObjectRecord) -> bool:
        return self.path(stage, record).is_file()

    def load(self, stage: str, record: ObjectRecord) -> dict[str, np.ndarray]:
        return load_npz(self.path(stage, record))

    def save(self, stage: str, record: ObjectRecord, **arrays: Any) -> None:
        save_npz(self.path(stage, record), **arrays)

    def count_done(self) -> dict[str, int]:
        """Finished per-object files of each cache directory that has any (what a rerun will skip)."""
        counts = {}
        for stage in CACHE_STAGES:
            d = self.root / stage
            n = sum(1 for _ in d.glob("*.npz")) if d.is_dir() else 0
            if n:
                counts[stage] = n
        return counts

    def log_failure(self, record: ObjectRecord, stage: str, error: BaseException) -> None:
        line = json.dumps({"uid": record.uid, "stage": stage, "error": f"{type(error).__name__}: {error}"})
        with open(self.failures_path, "a") as f:  # O_APPEND: safe across concurrent array tasks
            f.write(line + "\n")

    def bind_config(self, cfg: EngineConfig) -> None:
        """Record the cache-relevant settings; refuse a different set on an existing work dir."""
        path = self.root / "config.json"
        sig = cfg.cache_signature()
        if path.is_file():
            old = json.loads(path.read_text())
            diff = {k: (old.get(k), v) for k, v in sig.items() if k in old and old[k] != v}
            if diff:
                raise ValueError(
                    f"work dir {self.root} was built with other settings {diff} (old, new); "
                    "use a new --work directory or the same settings"
                )
        else:
            write_bytes_atomic(path, json.dumps(sig, indent=1, sort_keys=True).encode())

    def bind_teacher(self, teacher_id: str) -> None:
        """Refuse to mix teachers in one work dir: the same spec can resolve to real weights on one
        run and to the random fallback on another (weights added or removed in between)."""
        path = self.root / "teacher.json"
        if path.is_file():
            old = json.loads(path.read_text())["teacher_id"]
            if old != teacher_id:
                raise ValueError(
                    f"work dir {self.root} holds features from teacher {old!r}, this run loaded "
                    f"{teacher_id!r}; use a new --work directory"
                )
        else:
            write_bytes_atomic(path, json.dumps({"teacher_id": teacher_id}).encode())
