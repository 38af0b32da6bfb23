"""The objects of a build: :class:`ObjectRecord`, the object list on disk, mesh discovery, chunking.

Records say what an object is and where it comes from; how it is read is its source plug-in's
business (:mod:`patchalign.engine.sources`). The object list ``WORK/objects.jsonl`` is written once
(``index`` or the first ``sample``) and read by every later stage and array task.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchalign.atomic import write_bytes_atomic
from patchalign.data.schema import sample_key

__all__ = [
    "MESH_SUFFIXES",
    "ObjectRecord",
    "chunk_records",
    "discover_meshes",
    "load_records",
    "save_records",
]

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".off", ".stl")


@dataclass
class ObjectRecord:
    """One object to process.

    Attributes:
        uid: unique id (relative mesh path without suffix, Find3D uid, ``demo-<cat>-<i>``).
        source: ``"mesh"`` (a mesh file), ``"demo"`` (procedural) or ``"find3d"`` (Find3D data root).
        path: mesh file, or the Find3D object's ``rendered/<class>_<uid>/oriented`` directory.
        category: free-form category name ("" if unknown).
        split: which shard set the object is written to.
        extra: source-specific fields (demo: ``seed``; find3d: ``points_dir``).
    """

    uid: str
    source: str
    path: str = ""
    category: str = ""
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """File-name-safe version of the uid (also the shard sample key)."""
        return sample_key(self.uid)


def save_records(path: Path, records: Sequence[ObjectRecord]) -> None:
    """Write the object list as JSON lines, atomically (identical content from concurrent tasks is fine)."""
    text = "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records)
    write_bytes_atomic(path, text.encode())


def load_records(path: Path) -> list[ObjectRecord]:
    if not path.is_file():
        raise FileNotFoundError(
            f"no object list at {path}: run the 'sample' stage (or 'build') with --meshes first"
        )
    return [ObjectRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _hash_fraction(uid: str) -> float:
    return int(hashlib.sha1(uid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def discover_meshes(root: str | os.PathLike, val_fraction: float = 0.0) -> list[ObjectRecord]:
    """Every mesh file under ``root`` (recursive), sorted; category = parent directory relative to root.

    ``val_fraction`` sends a deterministic, uid-hashed share of the objects to the ``val`` split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"mesh directory {root} does not exist")
    records = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in MESH_SUFFIXES or not p.is_file():
            continue
        rel = p.relative_to(root)
        uid = rel.with_suffix("").as_posix()
        category = rel.parent.as_posix() if rel.parent != Path(".") else ""
        split = "val" if _hash_fraction(uid) < val_fraction else "train"
        records.append(
            ObjectRecord(uid=uid, source="mesh", path=str(p.resolve()), category=category, split=split)
        )
    if not records:
        raise FileNotFoundError(f"no mesh files ({', '.join(MESH_SUFFIXES)}) under {root}")
    uids = [r.uid for r in records]
    dupes = {u for u in uids if uids.count(u) > 1}
    if dupes:
        raise ValueError(
            f"several files map to the same uid (same name, different suffix): {sorted(dupes)[:5]}"
        )
    return records


def chunk_records(
    records: Sequence[ObjectRecord], num_chunks: int = 1, chunk_id: int = 0
) -> list[ObjectRecord]:
    """Contiguous chunk ``chunk_id`` of ``num_chunks`` (Slurm array task -> its share of the objects)."""
    if num_chunks < 1 or not 0 <= chunk_id < num_chunks:
        raise ValueError(f"chunk_id must be in [0, {num_chunks}), got {chunk_id}")
    n = len(records)
    return list(records[chunk_id * n // num_chunks : (chunk_id + 1) * n // num_chunks])
