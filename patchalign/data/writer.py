"""Atomic, resumable shard writer and the manifest that describes a shard set.

Building shards from tens of thousands of objects (rendering + teacher features) takes hours and
runs as preemptible Slurm jobs, so the writer is built around two guarantees:

* **Atomic**: a shard is written under a hidden temp name (``.shard-000003.tar.tmp``) and
  ``os.replace``'d to its final name only once it is closed and fsynced; ``manifest.json`` is
  rewritten the same way after every finished shard. A reader globbing ``*.tar`` or reading the
  manifest can never see a half-written shard.
* **Resumable**: on start the writer reads the manifest, adopts finished shards that a crash left
  out of it (crash between the shard's and the manifest's ``os.replace``), deletes stale temp files,
  and exposes :attr:`ShardSetWriter.done_uids` so the producer can skip finished objects
  (``write`` also skips them itself).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from patchalign.atomic import atomic_path, write_bytes_atomic
from patchalign.data.schema import (
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    ObjectSample,
    ShardFormatError,
    encode_sample,
)
from patchalign.data.textbank import TextBank, load_text_bank

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TEXT_BANK_NAME = "text_bank.safetensors"
MANIFEST_FORMAT = "patchalign-shards"
_MEMBER_ORDER = (
    "points.npy",
    "features.npy",
    "membership.npy",
    "patch_centers.npy",
    "patch_features.npy",
    "parts.json",
    "meta.json",
)


@dataclass
class ShardInfo:
    """One finished shard: file name (relative to the manifest), sample count, size and checksum."""

    name: str
    n_samples: int
    bytes: int
    sha256: str
    uids: list[str] = field(default_factory=list)
    n_points: int = 0
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    """Contents of ``manifest.json`` plus the directory it lives in.

    Attributes:
        root: directory holding the manifest, shards and text bank.
        schema_version: :data:`~patchalign.data.schema.SCHEMA_VERSION` the shards were written with.
        shards: finished shards, in write order.
        text_bank: text bank file name relative to ``root`` (``None`` if not attached yet).
        feature_dim: teacher feature width ``C`` shared by every sample.
        targets: Stage 1 targets every sample carries (``["points"]``, ``["patches"]``, both, or
            ``[]`` for Stage-2-only sets); one kind per set so every batch has the same arrays.
        complete: ``True`` once :meth:`ShardSetWriter.close` ran; ``False`` while a build is running
            or after a crash (the listed shards are still valid).
    """

    root: Path
    schema_version: int
    shards: list[ShardInfo]
    text_bank: str | None = None
    feature_dim: int | None = None
    complete: bool = False
    prefix: str = "shard"
    targets: list[str] | None = None

    @property
    def n_samples(self) -> int:
        return sum(s.n_samples for s in self.shards)

    @property
    def vocabulary(self) -> dict[str, int]:
        """Part name -> number of objects carrying it (to build or check a text bank)."""
        vocab: Counter[str] = Counter()
        for s in self.shards:
            vocab.update(s.parts)
        return dict(sorted(vocab.items()))

    @property
    def totals(self) -> dict[str, int]:
        """``n_shards``, ``n_samples``, ``bytes``, ``n_points`` summed over the shards."""
        return {
            "n_shards": len(self.shards),
            "n_samples": self.n_samples,
            "bytes": sum(s.bytes for s in self.shards),
            "n_points": sum(s.n_points for s in self.shards),
        }

    def shard_paths(self) -> list[Path]:
        return [self.root / s.name for s in self.shards]

    def shard_urls(self) -> list[str]:
        """Shard paths as strings, the form WebDataset takes."""
        return [str(p) for p in self.shard_paths()]

    def text_bank_path(self) -> Path | None:
        return None if self.text_bank is None else self.root / self.text_bank

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "schema_version": self.schema_version,
            "prefix": self.prefix,
            "complete": self.complete,
            "feature_dim": self.feature_dim,
            "targets": self.targets,
            "text_bank": self.text_bank,
            "totals": self.totals,
            "vocabulary": self.vocabulary,
            "shards": [asdict(s) for s in self.shards],
        }


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Load a manifest from a shard directory or the ``manifest.json`` path itself.

    Raises:
        FileNotFoundError: no manifest there.
        ShardFormatError: not a patchalign manifest, or written with another schema version.
    """
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {path} (build shards first, see shards/README.md)")
    try:
        d = json.loads(file.read_text())
    except ValueError as e:
        raise ShardFormatError(f"{file} is not valid JSON: {e}") from e
    if d.get("format") != MANIFEST_FORMAT:
        raise ShardFormatError(f"{file} is not a patchalign shard manifest (format={d.get('format')!r})")
    if d.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ShardFormatError(
            f"{file} has schema_version {d.get('schema_version')!r}; this code reads "
            f"{list(READABLE_SCHEMA_VERSIONS)}. Rebuild the shards."
        )
    return Manifest(
        root=file.parent,
        schema_version=d["schema_version"],
        shards=[ShardInfo(**s) for s in d.get("shards", [])],
        text_bank=d.get("text_bank"),
        feature_dim=d.get("feature_dim"),
        complete=bool(d.get("complete", False)),
        prefix=d.get("prefix", "shard"),
        # version-1 sets carry per-point features only
        targets=d.get("targets", ["points"] if d["schema_version"] == 1 else None),
    )


class _HashingFile:
    """Write-through file wrapper that hashes and counts bytes, so finishing a shard needs no re-read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self.n


def _scan_shard(path: Path) -> ShardInfo:
    """Read a finished shard fully (uids, size, sha256); used to adopt shards missing from the manifest."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    uids: list[str] = []
    parts: Counter[str] = Counter()
    n_points = 0
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if m.name.endswith(".meta.json"):
                meta = json.loads(tar.extractfile(m).read())
                uids.append(meta["uid"])
                n_points += int(meta.get("n_points", 0))
            elif m.name.endswith(".parts.json"):
                parts.update(json.loads(tar.extractfile(m).read()))
    return ShardInfo(
        name=path.name,
        n_samples=len(uids),
        bytes=path.stat().st_size,
        sha256=sha.hexdigest(),
        uids=uids,
        n_points=n_points,
        parts=dict(parts),
    )


class ShardSetWriter:
    """Write :class:`ObjectSample` s into size-bounded tar shards plus ``manifest.json``.

    Use as a context manager::

        with ShardSetWriter(out_dir, text_bank="bank.safetensors") as w:
            for s in samples:
                if s.uid not in w.done_uids:   # optional: write() skips finished uids too
                    w.write(s)

    Args:
        out_dir: shard directory (created if missing). Re-opening an existing one resumes it.
        prefix: shard file prefix: ``{prefix}-{index:06d}.tar``.
        max_samples_per_shard: start a new shard after this many samples.
        max_bytes: ... or once a shard reaches this many bytes (whichever first).
        text_bank: optional text bank file. It is copied to ``out_dir/text_bank.safetensors`` and
            every written sample's part names must be in it (fail early, at build time, rather than
            skipping at train time). Can also be attached later with :meth:`set_text_bank`.
        verify: on resume, check listed shards by ``"size"`` (cheap) or full ``"sha256"``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples_per_shard: int = 256,
        max_bytes: int = 1 << 30,
        text_bank: str | os.PathLike | None = None,
        verify: str = "size",
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ValueError(f"prefix must be [A-Za-z0-9_-]+, got {prefix!r}")
        if max_samples_per_shard < 1 or max_bytes < 1:
            raise ValueError("max_samples_per_shard and max_bytes must be positive")
        if verify not in ("size", "sha256"):
            raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.max_bytes = max_bytes
        self._bank: TextBank | None = None
        self._tar: tarfile.TarFile | None = None
        self._raw: BinaryIO | None = None
        self._hfile: _HashingFile | None = None
        self._tmp_path: Path | None = None
        self._cur_uids: list[str] = []
        self._cur_vocab: Counter[str] = Counter()
        self._cur_points = 0
        self._dirty = False  # a sample's members are half-way into the current temp tar
        self._closed = False
        self.n_written = 0
        self.n_skipped = 0
        self.manifest = self._resume(verify)
        self._next_index = self._first_free_index()
        if text_bank is not None:
            self.set_text_bank(text_bank)

    # ----------------------------------------------------------------------------------- resume
    def _resume(self, verify: str) -> Manifest:
        for tmp in self.out_dir.glob(".*.tmp"):
            log.warning("removing stale temp file %s from an interrupted run", tmp)
            tmp.unlink()
        try:
            manifest = read_manifest(self.out_dir)
        except FileNotFoundError:
            manifest = Manifest(
                root=self.out_dir, schema_version=SCHEMA_VERSION, shards=[], prefix=self.prefix
            )
        if manifest.prefix != self.prefix:
            raise ValueError(
                f"{self.out_dir} holds shards with prefix {manifest.prefix!r}, not {self.prefix!r}"
            )
        kept: list[ShardInfo] = []
        for info in manifest.shards:
            p = self.out_dir / info.name
            ok = p.is_file() and p.stat().st_size == info.bytes
            if ok and verify == "sha256":
                ok = _scan_shard(p).sha256 == info.sha256
            if ok:
                kept.append(info)
            else:
                log.warning(
                    "shard %s is missing or does not match the manifest; its objects will be redone", p
                )
                p.unlink(missing_ok=True)
        listed = {s.name for s in kept}
        for p in sorted(self.out_dir.glob(f"{self.prefix}-*.tar")):
            if p.name not in listed:
                # Finished (it has its final name) but the manifest update did not happen.
                try:
                    kept.append(_scan_shard(p))
                    log.info("adopted finished shard %s that was missing from the manifest", p)
                except (tarfile.TarError, OSError, ValueError, KeyError) as e:
                    log.warning("dropping unreadable shard %s (%s)", p, e)
                    p.unlink()
        manifest.shards = kept
        manifest.complete = False
        manifest.schema_version = SCHEMA_VERSION  # new samples are written in the current version
        self.done_uids: set[str] = {u for s in kept for u in s.uids}
        return manifest

    def _first_free_index(self) -> int:
        used = [int(m.group(1)) for s in self.manifest.shards if (m := re.search(r"-(\d+)\.tar$", s.name))]
        return max(used, default=-1) + 1

    # ----------------------------------------------------------------------------------- API
    @property
    def text_bank(self) -> TextBank | None:
        return self._bank

    def set_text_bank(self, path: str | os.PathLike) -> None:
        """Attach a text bank: copy it next to the shards and check names already written against it."""
        src = Path(path)
        bank = load_text_bank(src)
        missing = sorted(n for n in self.manifest.vocabulary if n not in bank)
        missing += sorted(n for n in self._cur_vocab if n not in bank and n not in missing)
        if missing:
            raise ShardFormatError(f"text bank {src} lacks part names already written: {missing[:10]}")
        dst = self.out_dir / TEXT_BANK_NAME
        if src.resolve() != dst.resolve():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        self._bank = bank
        self.manifest.text_bank = TEXT_BANK_NAME

    def _agree(self, sample: ObjectSample, key: str, hint: str = "") -> None:
        """The first sample fixes the shard set's ``key`` (``feature_dim``, ``targets``) in the manifest;
        a later sample with another value is refused, since one set is read with one layout."""
        have, value = getattr(self.manifest, key), getattr(sample, key)
        if have is None:
            setattr(self.manifest, key, value)
        elif value != have:
            raise ShardFormatError(f"sample {sample.uid!r} has {key} {value}, shard set has {have}{hint}")

    def write(self, sample: ObjectSample) -> bool:
        """Append one sample; returns ``False`` (and writes nothing) if its uid is already done.

        Raises:
            ShardFormatError: the sample breaks the schema, its feature width differs from the
                shard set's, or (with a text bank attached) a part name is not in the bank.
        """
        if self._closed:
            raise RuntimeError("writer is closed")
        if sample.uid in self.done_uids:
            self.n_skipped += 1
            return False
        members = encode_sample(sample)  # validates
        self._agree(sample, "feature_dim")
        self._agree(sample, "targets", "; write per-point and patch-target samples to separate sets")
        if self._bank is not None:
            unknown = [n for n in sample.part_names if n not in self._bank]
            if unknown:
                raise ShardFormatError(
                    f"sample {sample.uid!r}: part names {unknown} are not in the text bank"
                )
        if self._tar is None:
            self._open_shard()
        key = members["__key__"]
        self._dirty = True
        for suffix in (m for m in _MEMBER_ORDER if m in members):
            data = members[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0  # reproducible bytes -> reproducible sha256
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._dirty = False
        self._cur_uids.append(sample.uid)
        self._cur_vocab.update(sample.part_names)
        self._cur_points += sample.num_points
        self.done_uids.add(sample.uid)
        self.n_written += 1
        if len(self._cur_uids) >= self.max_samples_per_shard or self._hfile.n >= self.max_bytes:
            self._finish_shard()
        return True

    def finish_shard(self) -> None:
        """End the current shard now (no-op if empty), e.g. to keep one category per shard."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._finish_shard()

    def close(self) -> Path:
        """Finish the open shard and write the final manifest (``complete: true``); returns its path."""
        if not self._closed:
            self._finish_shard()
            self.manifest.complete = True
            self._write_manifest()
            self._closed = True
        return self.out_dir / MANIFEST_NAME

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # Keep the finished work: whole samples in the open shard are still valid unless the
        # failure hit while a sample's members were being appended.
        if self._tar is not None and self._dirty:
            self._abort_shard()
        else:
            self._finish_shard()
        self._write_manifest()
        self._closed = True

    # ----------------------------------------------------------------------------------- internals
    def _open_shard(self) -> None:
        name = f"{self.prefix}-{self._next_index:06d}.tar"
        self._next_index += 1
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._raw = open(self._tmp_path, "wb")
        self._hfile = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._hfile, mode="w", format=tarfile.PAX_FORMAT)
        self._cur_uids, self._cur_vocab, self._cur_points = [], Counter(), 0

    def _abort_shard(self) -> None:
        assert self._raw is not None and self._tmp_path is not None
        self._raw.close()
        self._tmp_path.unlink(missing_ok=True)
        for u in self._cur_uids:
            self.done_uids.discard(u)
        self._tar = self._raw = self._hfile = None

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        assert self._raw is not None and self._hfile is not None and self._tmp_path is not None
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        final = self._tmp_path.with_name(self._tmp_path.name[1:].removesuffix(".tmp"))
        os.replace(self._tmp_path, final)
        self.manifest.shards.append(
            ShardInfo(
                name=final.name,
                n_samples=len(self._cur_uids),
                bytes=self._hfile.n,
                sha256=self._hfile.sha.hexdigest(),
                uids=list(self._cur_uids),
                n_points=self._cur_points,
                parts=dict(self._cur_vocab),
            )
        )
        self._tar = self._raw = self._hfile = None
        self._cur_uids, self._cur_vocab, self._cur_points = [], Counter(), 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        d = self.manifest.to_json()
        d["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_bytes_atomic(self.out_dir / MANIFEST_NAME, json.dumps(d, indent=1).encode(), fsync=True)
