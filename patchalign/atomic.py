"""Write a file so that its final name only ever holds complete content.

Shard builds, caches, text banks and segmentation outputs are resumed by checking whether a file
exists, so a file must never exist half-written: content goes to a hidden temp name next to it
(same filesystem, so the rename is atomic) and is ``os.replace``'d to the final name only once
written. The temp name carries the process id, so concurrent writers (Slurm array tasks, engine
worker processes) never share one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it becomes ``path``, on error it is removed.

    Args:
        path: the final file (its directory is created).
        fsync: flush the temp file to disk before the rename (small index files that must survive a
            power loss: the shard manifest); off for bulk per-object caches.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """``path.write_bytes(data)`` through :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
