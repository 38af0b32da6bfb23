"""File formats the benchmark readers use.

The point-file readers (PCD, PLY vertices, OBJ vertices) live in the core room,
:mod:`patchalign.io`, where ``viz`` and ``zerokey.data`` read them too; they are re-exported here
under the names the readers (and older callers) import. Only the optional h5py import is evaluation's.
"""

from __future__ import annotations

from typing import Any

from patchalign.io import read_obj_vertices, read_pcd_xyz, read_ply_xyz

__all__ = ["read_obj_vertices", "read_pcd_xyz", "read_ply_xyz", "require_h5py"]


def require_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .h5 benchmark files needs h5py: pip install h5py") from e
    return h5py
