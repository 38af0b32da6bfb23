"""Small point-file readers used by the benchmark readers (no open3d / plyfile dependency).

PCD as Open3D and PCL write it (Find3D's ``points5000.pcd``, KeypointNet's pcds), PLY vertices
(PartSLIP's ``pc.ply``) and OBJ vertices in file order (SATR's FAUST scans, whose labels index
the vertices). These are file formats, not benchmarks: callers outside evaluation (``viz``,
``zerokey.data``) read PCD through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from patchalign.eval.readers.base import PathLike


def read_pcd_xyz(path: PathLike) -> np.ndarray:
    """``x y z`` of a PCD file (``DATA ascii`` or ``binary``; as written by Open3D and PCL).

    ``binary_compressed`` (LZF) is rejected with a clear error: re-save the file uncompressed.
    """
    path = Path(path)
    with open(path, "rb") as f:
        header: dict[str, list[str]] = {}
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: PCD header ended before a DATA line")
            text = line.decode("ascii", errors="replace").strip()
            if not text or text.startswith("#"):
                continue
            key, *vals = text.split()
            header[key.upper()] = vals
            if key.upper() == "DATA":
                break
        body = f.read()
    fields = header.get("FIELDS", [])
    if not {"x", "y", "z"} <= set(fields):
        raise ValueError(f"{path}: PCD has no x/y/z fields (FIELDS {fields})")
    n = int(header.get("POINTS", header.get("WIDTH", ["0"]))[0])
    sizes = [int(s) for s in header.get("SIZE", ["4"] * len(fields))]
    types = header.get("TYPE", ["F"] * len(fields))
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    mode = header["DATA"][0].lower()
    cols = [fields.index(a) for a in ("x", "y", "z")]
    if mode == "ascii":
        arr = np.array(body.split(), dtype=np.float64).reshape(n, sum(counts))
        offsets = np.cumsum([0] + counts)
        return arr[:, [offsets[c] for c in cols]].astype(np.float32)
    if mode == "binary":
        kinds = {"F": "f", "I": "i", "U": "u"}
        dtype = np.dtype(
            [
                (f"f{i}", f"<{kinds[t]}{s}", (c,) if c > 1 else ())
                for i, (s, t, c) in enumerate(zip(sizes, types, counts, strict=True))
            ]
        )
        rec = np.frombuffer(body[: n * dtype.itemsize], dtype=dtype, count=n)
        return np.stack([rec[f"f{c}"].astype(np.float32) for c in cols], axis=1)
    raise ValueError(f"{path}: PCD 'DATA {mode}' is not supported (only ascii and binary)")


def read_ply_xyz(path: PathLike) -> np.ndarray:
    """Vertex positions of a PLY file (point cloud or mesh, ascii or binary), in file order."""
    import trimesh

    loaded = trimesh.load(str(path), process=False)
    verts = getattr(loaded, "vertices", None)
    if verts is None or len(verts) == 0:
        raise ValueError(f"{path}: PLY has no vertices")
    return np.asarray(verts, dtype=np.float32)


def read_obj_vertices(path: PathLike) -> np.ndarray:
    """``v x y z`` lines of an OBJ file in file order (per-vertex labels index these).

    Parsed directly rather than via trimesh, which may merge or reorder vertices.
    """
    rows = [ln.split()[1:4] for ln in Path(path).read_text().splitlines() if ln.startswith("v ")]
    if not rows:
        raise ValueError(f"{path}: OBJ has no vertices")
    return np.asarray(rows, dtype=np.float32)


def require_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .h5 benchmark files needs h5py: pip install h5py") from e
    return h5py
