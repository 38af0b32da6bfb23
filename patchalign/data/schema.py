"""On-disk sample schema of patchalign shards: one :class:`ObjectSample` per 3D object.

A shard is a plain POSIX tar (WebDataset convention: consecutive members sharing a key form one
sample). Each sample has five members (see ``shards/README.md``)::

    <key>.points.npy      (N, 3) float32   coordinates (unit-sphere normalised, or the source's frame)
    <key>.features.npy    (N, C) float16   per-point teacher features, L2-normalised (0-rows = no feature);
                          (N, 0) when the sample carries no per-point features (compact samples)
    <key>.membership.npy  (N, ceil(L/8)) uint8, ``np.packbits(membership, axis=1)``
    <key>.parts.json      list of L cleaned part names
    <key>.meta.json       dict: uid, schema_version, n_points, n_parts, feature_dim, targets, + provenance

and, from schema version 2, optionally the released code's compact Stage 1 targets (both or neither)::

    <key>.patch_centers.npy   (G0, 3) float32  stored patch centres, same frame as ``points``
    <key>.patch_features.npy  (G0, C) float16  one teacher feature per stored patch, L2-normalised

(PatchAlign3D's ``patch_features.pt``: 128 centres x 768 fp16 = ~200 KB instead of 7.75 MB of
per-point features; targets are matched by :func:`patchalign.patch_targets.match_patch_targets`.)
Version-1 shards (no patch members, ``C >= 1``) are still read.

Why ``.npy`` rather than raw bytes: the files are self-describing (dtype, shape) so a shard can be
inspected with ``tar x`` + ``np.load``, yet decoding is zero-copy (:func:`npy_from_bytes` parses the
header and wraps the payload with ``np.frombuffer``). Why packed bits: membership is boolean and
``N x L`` bytes would cost as much as the coordinates; packed it is 8x smaller.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from patchalign.text import clean_part_name

SCHEMA_VERSION: int = 2
"""Bumped whenever the member set or a dtype changes; readers reject versions not in
:data:`READABLE_SCHEMA_VERSIONS`. Version 2 added the optional patch-target members and allowed
``(N, 0)`` per-point features."""

READABLE_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)
"""Versions this code decodes (a version-1 sample is a version-2 sample without patch targets)."""

MIN_POINTS: int = 2048
"""Smallest point count a stored object may have (the encoder consumes 2048-point clouds)."""

FEATURE_NORM_TOLERANCE: float = 2e-2
"""Allowed ``| ||f|| - 1 |`` per row: fp16 storage rounds each component to ~1e-3 relative."""

SAMPLE_MEMBERS: tuple[str, ...] = ("points.npy", "features.npy", "membership.npy", "parts.json", "meta.json")
"""Member suffixes every sample must have."""

PATCH_MEMBERS: tuple[str, ...] = ("patch_centers.npy", "patch_features.npy")
"""Optional members (schema 2): the compact per-shape Stage 1 targets, both or neither."""

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ShardFormatError(ValueError):
    """A sample or shard does not follow the schema. The message names the object and the problem.

    ``reason`` is a short machine-readable category (``"missing_keys"``, ``"non_finite"``,
    ``"too_few_points"``, ``"decode_error"``, ``"schema"``, ...) that the data loader uses to count skips.
    """

    def __init__(self, message: str, reason: str = "schema") -> None:
        super().__init__(message)
        self.reason = reason


def sample_key(uid: str) -> str:
    """Tar-safe WebDataset key for ``uid``.

    WebDataset splits member names at the first ``.`` of the basename and treats ``/`` as a
    directory, so uids such as ``"objaverse/abc.v2"`` cannot be used verbatim. Unsafe characters
    become ``_`` and, when anything was replaced, a short hash of the original uid keeps keys unique.
    The true uid is stored in ``meta.json``.
    """
    safe = _KEY_UNSAFE.sub("_", uid)[:96]
    if safe != uid or not safe:
        safe = f"{safe}-{hashlib.sha1(uid.encode()).hexdigest()[:10]}"
    return safe


@dataclass
class ObjectSample:
    """One object: points, per-point teacher features and multi-label part membership.

    Attributes:
        uid: globally unique object id (also ``meta["uid"]``).
        points: ``(N, 3)`` float32, ``N >= MIN_POINTS`` (Find3D stores 5000).
        features: ``(N, C)`` float16, each row L2-normalised, or all zero where no teacher
            feature reached the point (such points are masked out of the distillation loss).
        membership: ``(N, L)`` bool; a point may belong to several parts (or none).
        part_names: ``L`` unique cleaned names (:func:`clean_part_name`), never ``"unknown"``.
        meta: JSON-serialisable provenance (category, source, normalisation, up_axis, teacher id,
            n_views, ...). ``uid`` is filled in if missing.
        patch_centers: optional ``(G0, 3)`` float32 stored patch centres (released Stage 1 targets),
            in the frame of ``points``.
        patch_features: optional ``(G0, C)`` float16, one L2-normalised teacher feature per centre.
    """

    uid: str
    points: np.ndarray
    features: np.ndarray
    membership: np.ndarray
    part_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    patch_centers: np.ndarray | None = None
    patch_features: np.ndarray | None = None

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def has_patch_targets(self) -> bool:
        return self.patch_features is not None

    @property
    def targets(self) -> list[str]:
        """Which Stage 1 targets the sample carries: ``"points"`` (per-point) and/or ``"patches"``."""
        out = ["points"] if self.features.ndim == 2 and self.features.shape[1] > 0 else []
        return out + (["patches"] if self.has_patch_targets else [])

    @property
    def feature_dim(self) -> int:
        """Teacher width ``C``: of the per-point features, else of the patch features, else 0."""
        if self.features.ndim == 2 and self.features.shape[1] > 0:
            return int(self.features.shape[1])
        if self.patch_features is not None and self.patch_features.ndim == 2:
            return int(self.patch_features.shape[1])
        return 0

    def _validate_patches(self, where: str, check_features: bool) -> None:
        if (self.patch_centers is None) != (self.patch_features is None):
            raise ShardFormatError(f"{where}: patch_centers and patch_features come together", "bad_array")
        if self.patch_centers is None:
            return
        _check_array(where, "patch_centers", self.patch_centers, np.float32, 2)
        _check_array(where, "patch_features", self.patch_features, np.float16, 2)
        g0 = self.patch_centers.shape[0]
        if g0 < 1 or self.patch_centers.shape[1] != 3:
            raise ShardFormatError(
                f"{where}: patch_centers must be (G0>=1, 3), got {self.patch_centers.shape}", "bad_array"
            )
        if self.patch_features.shape[0] != g0 or self.patch_features.shape[1] < 1:
            raise ShardFormatError(
                f"{where}: patch_features must be ({g0}, C>=1), got {self.patch_features.shape}", "bad_array"
            )
        c = self.features.shape[1]
        if c > 0 and self.patch_features.shape[1] != c:
            raise ShardFormatError(
                f"{where}: patch_features width {self.patch_features.shape[1]} != per-point width {c}"
            )
        if not np.isfinite(self.patch_centers).all():
            raise ShardFormatError(f"{where}: patch_centers contain NaN/Inf", "non_finite")
        if check_features:
            check_feature_rows(f"{where} (patch_features)", self.patch_features)

    def validate(self, min_points: int = MIN_POINTS, check_features: bool = True) -> None:
        """Check every schema rule; raise :class:`ShardFormatError` naming the first violation.

        Args:
            min_points: smallest acceptable ``N``.
            check_features: also scan all ``N x C`` feature values (finite, unit norm). The writer
                always does; the training loader skips this full scan and checks only the rows it
                gathers, because converting 5000 x 768 fp16 values per object would cost more than
                reading the object from disk.
        """
        where = f"sample {self.uid!r}"
        if not isinstance(self.uid, str) or not self.uid:
            raise ShardFormatError(f"uid must be a non-empty string, got {self.uid!r}")
        _check_array(where, "points", self.points, np.float32, 2)
        n = self.points.shape[0]
        if self.points.shape[1] != 3:
            raise ShardFormatError(f"{where}: points must be (N, 3), got {self.points.shape}")
        if n < min_points:
            raise ShardFormatError(
                f"{where}: {n} points, fewer than the minimum {min_points}", "too_few_points"
            )
        if not np.isfinite(self.points).all():
            raise ShardFormatError(f"{where}: points contain NaN/Inf", "non_finite")
        _check_array(where, "features", self.features, np.float16, 2)
        if self.features.shape[0] != n:
            raise ShardFormatError(f"{where}: features must be ({n}, C), got {self.features.shape}")
        if check_features and self.features.shape[1] > 0:
            check_feature_rows(where, self.features)
        self._validate_patches(where, check_features)
        if not isinstance(self.part_names, list) or not all(isinstance(p, str) for p in self.part_names):
            raise ShardFormatError(f"{where}: part_names must be a list of str")
        _check_array(where, "membership", self.membership, np.bool_, 2)
        if self.membership.shape != (n, len(self.part_names)):
            raise ShardFormatError(
                f"{where}: membership must be (N, L) = ({n}, {len(self.part_names)}), "
                f"got {self.membership.shape}"
            )
        for name in self.part_names:
            if name != clean_part_name(name) or not name:
                raise ShardFormatError(
                    f"{where}: part name {name!r} is not clean; "
                    f"use clean_part_name() -> {clean_part_name(name)!r}"
                )
            if name == "unknown":
                raise ShardFormatError(f"{where}: 'unknown' is not a part; drop those points' label instead")
        if len(set(self.part_names)) != len(self.part_names):
            raise ShardFormatError(f"{where}: duplicate part names {self.part_names}")
        if not isinstance(self.meta, dict):
            raise ShardFormatError(f"{where}: meta must be a dict")
        if self.meta.get("uid", self.uid) != self.uid:
            raise ShardFormatError(f"{where}: meta['uid']={self.meta['uid']!r} differs from uid")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as e:
            raise ShardFormatError(f"{where}: meta is not JSON-serialisable: {e}") from e


def check_feature_rows(where: str, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check rows are finite and unit-norm (or exactly zero); returns the float32 copy and the row norms."""
    f32 = features.astype(np.float32)
    if not np.isfinite(f32).all():
        raise ShardFormatError(f"{where}: features contain NaN/Inf", "non_finite")
    norms = np.sqrt(np.einsum("nc,nc->n", f32, f32))
    bad = (np.abs(norms - 1.0) > FEATURE_NORM_TOLERANCE) & (norms != 0.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ShardFormatError(
            f"{where}: features must be L2-normalised per point (or all zero); "
            f"{int(bad.sum())} rows are not, e.g. row {i} has norm {norms[i]:.4f}",
            "bad_features",
        )
    return f32, norms


def _check_array(where: str, name: str, a: Any, dtype: type, ndim: int) -> None:
    if not isinstance(a, np.ndarray):
        raise ShardFormatError(f"{where}: {name} must be a numpy array, got {type(a).__name__}", "bad_array")
    if a.dtype != dtype:
        raise ShardFormatError(f"{where}: {name} must be {np.dtype(dtype).name}, got {a.dtype}", "bad_array")
    if a.ndim != ndim:
        raise ShardFormatError(f"{where}: {name} must have {ndim} dims, got shape {a.shape}", "bad_array")


def npy_to_bytes(a: np.ndarray) -> bytes:
    """Serialise one array in ``.npy`` format (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_from_bytes(data: bytes | memoryview) -> np.ndarray:
    """Zero-copy ``.npy`` decode: parse the header, wrap the payload with ``np.frombuffer``.

    ``np.load(BytesIO(...))`` copies the payload; for 5000 x 768 fp16 features that copy is a large
    share of decode time. The result is read-only (it views ``data``), which is fine because the
    loader only gathers rows from it. Raises :class:`ShardFormatError` on anything malformed.
    """
    mv = memoryview(data)
    if len(mv) < 10 or bytes(mv[:6]) != b"\x93NUMPY":
        raise ShardFormatError("not a .npy payload (bad magic)", "decode_error")
    major = mv[6]
    if major == 1:
        hlen = int.from_bytes(mv[8:10], "little")
        start = 10
    elif major in (2, 3):
        hlen = int.from_bytes(mv[8:12], "little")
        start = 12
    else:
        raise ShardFormatError(f"unsupported .npy version {major}", "decode_error")
    try:
        header = ast.literal_eval(bytes(mv[start : start + hlen]).decode("latin1"))
        dtype = np.dtype(header["descr"])
        shape = tuple(header["shape"])
        fortran = bool(header["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise ShardFormatError(f"malformed .npy header: {e}", "decode_error") from e
    if dtype.hasobject:
        raise ShardFormatError("object arrays are not allowed in shards", "decode_error")
    count = math.prod(shape)
    offset = start + hlen
    if len(mv) - offset != count * dtype.itemsize:
        raise ShardFormatError(
            f".npy payload has {len(mv) - offset} bytes, "
            f"expected {count * dtype.itemsize} for {shape} {dtype}",
            "decode_error",
        )
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def encode_sample(s: ObjectSample) -> dict[str, bytes | str]:
    """Validate and serialise a sample into WebDataset members (``__key__`` plus suffix -> bytes)."""
    s.validate()
    meta = dict(s.meta)
    meta.update(
        uid=s.uid,
        schema_version=SCHEMA_VERSION,
        n_points=s.num_points,
        n_parts=len(s.part_names),
        feature_dim=s.feature_dim,
        targets=s.targets,
    )
    if s.has_patch_targets:
        meta["n_patches"] = int(s.patch_centers.shape[0])
    out: dict[str, bytes | str] = {
        "__key__": sample_key(s.uid),
        "points.npy": npy_to_bytes(s.points),
        "features.npy": npy_to_bytes(s.features),
        "membership.npy": npy_to_bytes(np.packbits(s.membership, axis=1)),
        "parts.json": json.dumps(s.part_names).encode(),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }
    if s.has_patch_targets:
        out["patch_centers.npy"] = npy_to_bytes(s.patch_centers)
        out["patch_features.npy"] = npy_to_bytes(s.patch_features)
    return out


def decode_sample(
    d: dict[str, Any], min_points: int = MIN_POINTS, validate: bool = True, check_features: bool = True
) -> ObjectSample:
    """Inverse of :func:`encode_sample`; accepts a raw WebDataset sample dict.

    Args:
        d: members keyed by suffix (``"points.npy"`` ...); ``__key__``/``__url__`` etc. are ignored.
        min_points: passed to :meth:`ObjectSample.validate`.
        validate: run :meth:`ObjectSample.validate` (``False`` only if the caller checks itself).
        check_features: passed to :meth:`ObjectSample.validate`.

    Raises:
        ShardFormatError: missing member, wrong schema version, malformed payload or a schema rule.
    """
    key = d.get("__key__", "?")
    missing = [m for m in SAMPLE_MEMBERS if m not in d]
    if missing:
        raise ShardFormatError(
            f"sample {key!r} ({d.get('__url__', '?')}) is missing members {missing}", "missing_keys"
        )
    try:
        meta = json.loads(d["meta.json"])
        part_names = json.loads(d["parts.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"sample {key!r}: bad JSON member: {e}", "decode_error") from e
    if not isinstance(meta, dict) or "uid" not in meta:
        raise ShardFormatError(f"sample {key!r}: meta.json must be an object with a 'uid'", "decode_error")
    version = meta.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ShardFormatError(
            f"sample {meta['uid']!r}: schema_version {version!r}, this reader understands "
            f"{list(READABLE_SCHEMA_VERSIONS)}",
            "schema_version",
        )
    has_patches = [m in d for m in PATCH_MEMBERS]
    if any(has_patches) and not all(has_patches):
        raise ShardFormatError(
            f"sample {meta['uid']!r}: has only one of the patch-target members {list(PATCH_MEMBERS)}",
            "missing_keys",
        )
    try:
        points = npy_from_bytes(d["points.npy"])
        features = npy_from_bytes(d["features.npy"])
        packed = npy_from_bytes(d["membership.npy"])
        centers = npy_from_bytes(d["patch_centers.npy"]) if all(has_patches) else None
        patch_feats = npy_from_bytes(d["patch_features.npy"]) if all(has_patches) else None
    except ShardFormatError as e:
        raise ShardFormatError(f"sample {meta['uid']!r}: {e}", e.reason) from e
    if not isinstance(part_names, list):
        raise ShardFormatError(f"sample {meta['uid']!r}: parts.json must be a list", "decode_error")
    n_parts = len(part_names)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != (n_parts + 7) // 8:
        raise ShardFormatError(
            f"sample {meta['uid']!r}: membership must be packed uint8 (N, {(n_parts + 7) // 8}), "
            f"got {packed.dtype} {packed.shape}",
            "bad_array",
        )
    membership = np.unpackbits(packed, axis=1, count=n_parts).astype(bool)
    sample = ObjectSample(
        uid=meta["uid"],
        points=points,
        features=features,
        membership=membership,
        part_names=part_names,
        meta=meta,
        patch_centers=centers,
        patch_features=patch_feats,
    )
    if validate:
        sample.validate(min_points=min_points, check_features=check_features)
    return sample
