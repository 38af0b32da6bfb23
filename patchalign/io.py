"""Reading shape files: one reader per file format, shared by every layer above.

Core room (imports numpy, torch-free readers and trimesh only): the renderer
(:func:`patchalign.render.load_mesh_normalized`), the evaluation readers
(:mod:`patchalign.eval.readers`), ZeroKey (:mod:`zerokey.data`) and the pictures tool
(:mod:`patchalign.tools.viz`) all read files through here, so a format is parsed one way everywhere.

* :func:`read_pcd_xyz`: PCD as Open3D and PCL write it (Find3D's ``points5000.pcd``, KeypointNet's
  pcds), ``DATA ascii`` / ``binary``.
* :func:`read_ply_xyz`: PLY vertices (PartSLIP's ``pc.ply``), :func:`read_obj_vertices`: OBJ
  ``v`` lines in file order (SATR's FAUST scans, whose labels index the vertices).
* :func:`read_point_file`: any point file by suffix (``.npy``, ``.txt``/``.xyz``/``.pts``, ``.pcd``).
* :func:`load_geometry`: any trimesh-readable mesh or point cloud with file order kept
  (``process=False``) and scenes merged with their node transforms applied.

No open3d / plyfile dependency.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "POINT_SUFFIXES",
    "GeometryLoadError",
    "load_geometry",
    "read_obj_vertices",
    "read_pcd_xyz",
    "read_ply_xyz",
    "read_point_file",
]

PathLike = str | os.PathLike

#: Suffixes :func:`read_point_file` reads (lower case).
POINT_SUFFIXES = (".npy", ".txt", ".xyz", ".pts", ".pcd")


class GeometryLoadError(ValueError):
    """A shape file could not be parsed, or holds non-finite coordinates / out-of-range faces."""


def read_pcd_xyz(path: PathLike) -> np.ndarray:
    """``x y z`` (N, 3) float32 of a PCD file (``DATA ascii`` or ``binary``; as Open3D and PCL write).

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


def read_point_file(path: PathLike) -> np.ndarray:
    """(N, 3) float32 points of a point file chosen by suffix (:data:`POINT_SUFFIXES`).

    ``.npy`` and text files keep their first three columns. Empty files and non-finite coordinates
    are errors (a NaN would otherwise surface much later as a wrong normalisation).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        xyz = np.load(path).astype(np.float32)[:, :3]
    elif suffix in (".txt", ".xyz", ".pts"):
        xyz = np.loadtxt(path, dtype=np.float32, ndmin=2)[:, :3]
    elif suffix == ".pcd":
        xyz = read_pcd_xyz(path)
    else:
        raise ValueError(f"{path}: not a point file (expected one of {POINT_SUFFIXES})")
    if len(xyz) == 0:
        raise ValueError(f"{path}: no points")
    if not np.isfinite(xyz).all():
        raise ValueError(f"{path}: points contain non-finite coordinates")
    return xyz


def load_geometry(path: PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``(vertices (N, 3) float64, faces (F, 3) int64 or None)`` of a mesh or point-cloud file.

    Anything trimesh reads (.obj/.ply/.glb/.off/.stl/...), vertex and face order as in the file
    (``process=False``) so face indices stay meaningful for annotations that refer to them (e.g.
    KeypointNet's ``mesh_info.face_index``). A scene's triangle meshes are concatenated with their
    node transforms applied; a scene without triangles falls back to its point clouds. ``faces`` is
    None for a point cloud. Empty geometry comes back as zero-length arrays: whether that is an error
    depends on the caller (the renderer needs triangles, ZeroKey accepts point clouds).

    Raises:
        GeometryLoadError: trimesh cannot parse the file, an unsupported geometry type, non-finite
            vertices, or faces indexing outside the vertices.
    """
    import trimesh

    try:
        loaded = trimesh.load(str(path), force=None, process=False)
    except Exception as error:  # trimesh raises many types for unreadable files
        raise GeometryLoadError(f"{path}: {error}") from error
    faces: np.ndarray | None
    if isinstance(loaded, trimesh.Scene):
        parts = loaded.dump()
        meshes = [g for g in parts if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        if meshes:
            loaded = trimesh.util.concatenate(meshes)
        else:
            clouds = [np.asarray(g.vertices) for g in parts if isinstance(g, trimesh.PointCloud)]
            loaded = (
                trimesh.PointCloud(np.concatenate(clouds)) if clouds else trimesh.PointCloud(np.zeros((0, 3)))
            )
    if isinstance(loaded, trimesh.PointCloud):
        vertices, faces = np.asarray(loaded.vertices, dtype=np.float64).reshape(-1, 3), None
    elif isinstance(loaded, trimesh.Trimesh):
        vertices = np.asarray(loaded.vertices, dtype=np.float64).reshape(-1, 3)
        faces = np.asarray(loaded.faces, dtype=np.int64).reshape(-1, 3)
    else:
        raise GeometryLoadError(f"{path}: unsupported geometry type {type(loaded).__name__}")
    if not np.isfinite(vertices).all():
        raise GeometryLoadError(f"{path}: NaN or inf vertex coordinates")
    if faces is not None and len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise GeometryLoadError(f"{path}: face indices outside its {len(vertices)} vertices")
    return vertices, faces
