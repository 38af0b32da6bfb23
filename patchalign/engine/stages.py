"""The per-object and global stages of the data engine, each a function over records and a work dir.

Stages (each a function over a list of :class:`~patchalign.engine.records.ObjectRecord` and a
:class:`~patchalign.engine.workdir.WorkDir`)::

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

Resumability: a stage skips an object whose output file exists (files are written atomically, see
:mod:`patchalign.engine.workdir`). Bad objects (unreadable or empty mesh, no visible face, ...) are
logged, counted and appended to ``failures.jsonl``; the run goes on, and downstream stages count
them as ``missing_input``. If every attempted object of a stage fails and none was done before, the
stage raises: that is a bug or a broken setup, not bad data.

Where things run: rendering uses Embree on CPU tensors or PyTorch3D on CUDA tensors
(``patchalign.render``); the teacher and the back-projection run on ``device``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from patchalign.data import ObjectSample, ShardSetWriter, save_text_bank
from patchalign.engine.backproject import backproject_features
from patchalign.engine.config import RELEASED_DINOV2_INPUT, EngineConfig
from patchalign.engine.records import ObjectRecord
from patchalign.engine.sources import source_of
from patchalign.engine.teachers import Teacher, load_teacher
from patchalign.engine.workdir import WorkDir
from patchalign.geometry import sample_surface
from patchalign.render import find3d_view_layout, fov_to_fit_unit_sphere, look_at_cameras
from patchalign.render import render_mesh as _render_mesh
from patchalign.text import TextEmbeddingCache, TextEncoder, encode_part_names, load_text_encoder

log = logging.getLogger(__name__)

TEXT_BANK_FILE = "text_bank.safetensors"
#: The stages that exist only to compute teacher features (skipped outside ``cfg.feature_splits``).
FEATURE_STAGES = ("render", "features", "backproject", "views")

__all__ = [
    "FEATURE_STAGES",
    "TEXT_BANK_FILE",
    "StageStats",
    "get_teacher",
    "get_text_encoder",
    "labels_for",
    "run_backproject",
    "run_features",
    "run_labels",
    "run_render",
    "run_sample",
    "run_textbank",
    "run_views",
    "run_write",
    "wants_features",
]


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


# ---------------------------------------------------------------------------------------- objects
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


def get_teacher(cfg: EngineConfig, cache: bool = True) -> Teacher:
    """The configured teacher, loaded once per process (``cache=False``: a fresh one, not kept)."""
    device = cfg.resolved_device()
    input_size = cfg.teacher_input_size
    if input_size is None and cfg.teacher_resize == "bicubic-crop" and cfg.teacher.startswith("dinov2"):
        input_size = RELEASED_DINOV2_INPUT  # released Resize(518) + CenterCrop(518)
    key = (cfg.teacher, input_size, cfg.teacher_resize, cfg.allow_random_teacher, str(device))
    if key in _TEACHERS:
        return _TEACHERS[key]
    teacher = load_teacher(
        cfg.teacher,
        device=device,
        input_size=input_size,
        allow_random=cfg.allow_random_teacher,
        resize=cfg.teacher_resize,
    )
    if cache:
        _TEACHERS[key] = teacher
    return teacher


_TEXT_ENCODERS: dict[tuple[str, str], TextEncoder] = {}


def get_text_encoder(cfg: EngineConfig) -> TextEncoder:
    """The configured text encoder, loaded once per process (the build's model check loads it first)."""
    device = cfg.resolved_device()
    key = (cfg.text_encoder, str(device))
    if key not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[key] = load_text_encoder(cfg.text_encoder, device=device)
    return _TEXT_ENCODERS[key]


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
        encoder = get_text_encoder(cfg)
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


def wants_features(cfg: EngineConfig, rec: ObjectRecord) -> bool:
    """Whether ``rec``'s split gets teacher features (``cfg.feature_splits``; None = every split)."""
    return cfg.feature_splits is None or rec.split in cfg.feature_splits
