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
* :func:`read_npy`: a ``.npy`` file that never runs code. Plain arrays load with
  ``allow_pickle=False``; an object array (PartSLIP's ``label.npy`` is ``np.save`` of a dict of arrays)
  only when the caller allows it, and then through an unpickler that can build numpy arrays, dtypes,
  scalars and plain containers and nothing else (:class:`UnsafePickleError` names the refused global).

No open3d / plyfile dependency.
"""

from __future__ import annotations

import ast
import collections
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "POINT_SUFFIXES",
    "GeometryLoadError",
    "UnsafePickleError",
    "load_geometry",
    "read_npy",
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


class UnsafePickleError(ValueError):
    """A file holds a pickled Python object this project will not unpickle.

    Unpickling runs whatever callables the file names (``os.system``, ``builtins.exec``, ...), so a
    data file must never be unpickled freely. ``refused`` is the ``module.name`` of the global the
    file asked for (None when the file was refused as a whole, e.g. an object array where only
    numbers are expected).
    """

    def __init__(self, message: str, path: Path, refused: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.refused = refused


# ----------------------------------------------------------------------------------------- .npy files

_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # numpy's own default limit (np.load's max_header_size)


class _NdarrayClass:
    """Stands in for ``numpy.ndarray`` inside a restricted unpickle.

    A pickled array names ``numpy.ndarray`` only as the first argument of ``_reconstruct``. Handing
    the unpickler the real class would also let a file *call* it: ``ndarray((n,), object, buffer)``
    turns arbitrary bytes into object pointers (memory corruption). This token is not callable and
    only :func:`_safe_reconstruct` accepts it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray (restricted)"


_NDARRAY = _NdarrayClass()
# The real numpy callables, taken from what numpy itself pickles (numpy 1.x names them
# ``numpy.core.multiarray.*``, numpy 2.x ``numpy._core.multiarray.*``; no private import needed).
_reconstruct = np.zeros(1).__reduce__()[0]
_scalar = np.int64(0).__reduce__()[0]


def _safe_reconstruct(subtype: object, shape: Any, dtype_code: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` for plain ``ndarray`` only (no subclasses)."""
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError(f"_reconstruct of {subtype!r}: only numpy.ndarray is allowed")
    return _reconstruct(np.ndarray, shape, dtype_code)


def _safe_scalar(dtype: object, *args: Any) -> Any:
    """``numpy.core.multiarray.scalar`` for a non-object dtype (an object scalar would be raw pointers)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy scalar of {dtype!r}: only numeric dtypes are allowed")
    return _scalar(dtype, *args)


#: ``module.name`` -> object: everything a restricted unpickle may reference. Exactly what
#: ``np.save`` of (dicts / lists / object arrays of) numpy arrays, dtypes, numpy scalars and plain
#: Python values writes under numpy 1.x and 2.x (protocol 3 and 4); ``dict`` / ``list`` / ``tuple`` /
#: ``str`` / ``bytes`` / numbers have their own opcodes and need no global.
_SAFE_GLOBALS: dict[str, Any] = {
    "numpy.ndarray": _NDARRAY,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray._reconstruct": _safe_reconstruct,
    "numpy._core.multiarray._reconstruct": _safe_reconstruct,
    "numpy.core.multiarray.scalar": _safe_scalar,
    "numpy._core.multiarray.scalar": _safe_scalar,
    "builtins.set": set,  # protocol 3 pickles sets / frozensets / complex numbers by name
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "collections.OrderedDict": collections.OrderedDict,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, numpy scalars and plain containers; refuses every other global.

    Every callable a pickle can invoke (REDUCE, NEWOBJ, INST, OBJ) comes from :meth:`find_class`,
    so allowing only the constructors in :data:`_SAFE_GLOBALS` means no other code can run.
    """

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        raise UnsafePickleError(
            f"{self._path}: refusing to unpickle {key} (a pickled .npy may hold only numpy arrays, dtypes, "
            "scalars and plain containers; anything else could run code when unpickled)",
            self._path,
            refused=key,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self._path}: refusing a pickle persistent id", self._path, refused="persistent_id"
        )


def _read_npy_header(f: BinaryIO, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` of the ``.npy`` header at the start of ``f``; ``f`` is left at the payload.

    Parsed here (``ast.literal_eval``, which evaluates literals only) so the dtype is known before a
    single payload byte is interpreted.
    """
    magic = f.read(8)
    if magic[:4] == b"PK\x03\x04":
        raise ValueError(f"{path}: is a .npz (zip) archive, not a .npy array")
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
        raise ValueError(f"{path}: not a .npy file (no \\x93NUMPY magic); refusing to read it as a pickle")
    major = magic[6]
    if major not in (1, 2, 3):
        raise ValueError(f"{path}: unsupported .npy format version {major}.{magic[7]}")
    hlen = int.from_bytes(f.read(2 if major == 1 else 4), "little")
    if hlen > _NPY_MAX_HEADER:
        raise ValueError(f"{path}: .npy header of {hlen} bytes is implausibly large")
    try:
        header = ast.literal_eval(f.read(hlen).decode("utf8" if major == 3 else "latin1"))
        dtype = np.lib.format.descr_to_dtype(header["descr"])
        shape = tuple(int(n) for n in header["shape"])
        bool(header["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed .npy header ({e})") from e
    return dtype, shape


def read_npy(path: PathLike, *, allow_objects: bool = False) -> np.ndarray:
    """The array in a ``.npy`` file, without ever running code from it.

    Args:
        path: the ``.npy`` file.
        allow_objects: read an object array (a pickled payload, e.g. PartSLIP's ``label.npy`` dict)
            with the restricted unpickler (:data:`_SAFE_GLOBALS`). When False, an object array is
            refused as a whole: numeric data (point clouds, label vectors) has no reason to be pickled.

    Raises:
        UnsafePickleError: the file names a global outside the allow-list (``refused`` holds it), or
            holds an object array when ``allow_objects`` is False.
        ValueError: not a ``.npy`` file (``.npz``, a bare pickle, garbage), a malformed header or a
            corrupt payload; the message starts with the path.
    """
    path = Path(path)
    with open(path, "rb") as f:
        dtype, shape = _read_npy_header(f, path)
        if not dtype.hasobject:
            f.seek(0)
            try:
                return np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f"{path}: corrupt .npy payload ({e})") from e
        if not allow_objects:
            raise UnsafePickleError(
                f"{path}: holds pickled Python objects (dtype {dtype}), not a plain numeric array; "
                "refusing to unpickle it (re-save it with np.save(path, np.asarray(values, dtype=float)))",
                path,
            )
        try:
            arr = _ArrayUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # a corrupt pickle raises many types (EOFError, TypeError, ...)
            raise ValueError(f"{path}: corrupt pickled .npy payload ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or arr.shape != shape or not arr.dtype.hasobject:
        raise ValueError(f"{path}: pickled payload is not the {shape} object array its header announces")
    return arr


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
    are errors (a NaN would otherwise surface much later as a wrong normalisation). A ``.npy`` is read
    by :func:`read_npy` without objects: a pickled one is refused (:class:`UnsafePickleError`), never run.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = read_npy(path)
        if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(
                f"{path}: expected an (N, 3+) numeric array of points, got {arr.dtype} {arr.shape}"
            )
        xyz = arr[:, :3].astype(np.float32)
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
