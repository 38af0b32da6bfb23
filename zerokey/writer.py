"""Streaming per-shape output into a run folder that never loses results.

:class:`KeypointJSONWriter` is a ``BasePredictionWriter`` writing one JSON per shape as batches finish
(use ``trainer.predict(..., return_predictions=False)`` so nothing accumulates in memory), plus
optional PNGs of the views with their 2D points and of the shape with its 3D keypoints.

**Run folders.** One setting decides where a run goes: ``trainer.default_root_dir`` (LightningCLI
saves the resolved ``config.yaml`` there too). The folder holds ``run.json`` -- the run id, the hash
of the method settings (namer, pointer, views, lifting, clustering; not the data selection) and the
run's status -- and every shape JSON records the same ``run_id`` and ``config_hash``. Rerunning into
a folder that holds a run:

* same config hash, ``on_existing="resume"`` (default): shapes already ``complete`` are skipped (not
  re-predicted, their files untouched); failed and new shapes are predicted;
* different config hash, or ``on_existing="refuse"``: the run stops before writing anything;
* ``on_existing="overwrite"``: the old run's prediction files are deleted first (you asked for it).

**A run's verdict** (``run.json`` ``status``): "finished"; "aborted" (stopped mid-run: failure budget
spent, an error, Ctrl-C); or "failed" -- it went to the end but completed no shape it predicted, or more
MLLM calls failed than the budget allows at the end (:class:`~zerokey.mllm.client.CallBudget`). Aborted
and failed runs exit non-zero through ``python -m zerokey``; every failed shape is listed either way.

Every file is written atomically (temp file + rename), so a killed job leaves no half JSON. The
interface is shared by every ZeroKey prediction loop (``ZeroKeyModule`` and detectors built on it):
the module provides ``method_settings()`` (hashed), optionally ``preflight()`` (called before anything
is written), ``budget`` (a :class:`~zerokey.mllm.client.CallBudget`, checked after every batch),
``done_ids`` (filled here: shapes to skip) and ``run_notes()`` (lines printed at the end).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from patchalign.geometry import sample_surface
from zerokey.pipeline import ShapePrediction, merge_parse_stats

__all__ = [
    "KeypointJSONWriter",
    "ZeroKeyRunError",
    "RUN_MANIFEST",
    "config_hash",
    "read_manifest",
    "prediction_path",
    "write_prediction",
    "write_json_atomic",
    "iter_prediction_files",
    "plot_views",
    "plot_shape",
]

RUN_MANIFEST = "run.json"


class ZeroKeyRunError(RuntimeError):
    """A run cannot start or must stop (server down, failure budget spent, folder holds another run).
    ``python -m zerokey`` prints its one-line message and exits non-zero."""


def config_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of a settings dict (sorted-key JSON)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON via a temp file + rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ZeroKeyRunError(f"{path} is not valid JSON ({err}); move it away or use a new folder") from err


def iter_prediction_files(run_dir: str | Path):
    """(path, record) of every shape JSON under ``run_dir`` (summaries / manifest / unreadable skipped)."""
    for path in sorted(Path(run_dir).rglob("*.json")):
        if path.name.startswith("summary") or path.name == RUN_MANIFEST:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("unreadable prediction file %s", path)
            continue
        if isinstance(record, dict) and "shape_id" in record and "keypoints" in record:
            yield path, record


log = logging.getLogger(__name__)


def prediction_path(output_dir: str | Path, shape_id: str, suffix: str = ".json") -> Path:
    """``shape_id`` "class/model" -> ``output_dir/class/model.json`` (ids never escape the folder)."""
    parts = [p for p in Path(shape_id).parts if p not in ("", ".", "..", "/")]
    return (
        Path(output_dir).joinpath(*parts).with_suffix(suffix)
        if parts
        else Path(output_dir) / f"unnamed{suffix}"
    )


def write_prediction(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write one shape record atomically (temp file + rename: a killed job leaves no half JSON)."""
    return write_json_atomic(prediction_path(output_dir, record["shape_id"]), record)


def _colors(n: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return np.array([cmap(i % 20) for i in range(max(n, 1))])


def plot_views(prediction: ShapePrediction, path: str | Path, columns: int = 7) -> Path:
    """Grid of the rendered views with each 2D point coloured by its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views, points, record = prediction.views, prediction.points, prediction.record
    if views is None or points is None:
        raise ValueError("plot_views needs a prediction made with keep_debug=True")
    n = views.n_views
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows))
    colors = _colors(len(record.get("names", [])))
    uv, view, name = points.uv.cpu().numpy(), points.view.cpu().numpy(), points.name_index.cpu().numpy()
    images = views.images.detach().cpu().numpy()
    for v, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if v >= n:
            continue
        ax.imshow(images[v], extent=(0, views.image_size, views.image_size, 0))
        sel = view == v
        if sel.any():
            ax.scatter(uv[sel, 0], uv[sel, 1], s=12, c=colors[name[sel]], edgecolors="k", linewidths=0.3)
        ax.set_title(f"view {v}", fontsize=7)
    fig.suptitle(record["shape_id"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_shape(prediction: ShapePrediction, path: str | Path, max_points: int = 4000) -> Path:
    """3D scatter of the shape (vertices / points, subsampled) with its predicted keypoints labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape, record = prediction.shape, prediction.record
    if shape is None:
        raise ValueError("plot_shape needs a prediction made with keep_debug=True")
    xyz = shape.vertices.detach().cpu().numpy()
    if shape.faces is not None and len(shape.faces):  # meshes: area-weighted samples (vertices can be sparse)
        try:
            xyz = sample_surface(shape.vertices, shape.faces, max_points, seed=0).points.cpu().numpy()
        except ValueError:  # zero surface area: draw the vertices
            pass
    if len(xyz) > max_points:
        xyz = xyz[np.random.default_rng(0).choice(len(xyz), max_points, replace=False)]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    # y is up in ShapeNet / our cameras; matplotlib's 3D axes have z up.
    ax.scatter(xyz[:, 0], xyz[:, 2], xyz[:, 1], s=1, c="0.6", alpha=0.4)
    names = record.get("names", [])
    colors = _colors(len(names))
    for kp in record.get("keypoints", []):
        p = kp["xyz_normalized"]
        c = colors[names.index(kp["name"])] if kp["name"] in names else "r"
        ax.scatter([p[0]], [p[2]], [p[1]], s=40, color=c, edgecolors="k")
        ax.text(p[0], p[2], p[1], kp["name"][:24], fontsize=6)
    ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
    ax.set_title(record["shape_id"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def dropped_views(summary: dict[str, Any]) -> dict[str, Any]:
    """Pointer answers whose whole view was dropped by the answer rules (``parse: xml`` / ``max_points``,
    the authors' rules): counts of this rank's summary, for ``run.json`` and the closing lines."""
    pointer = (summary.get("parse_stats") or {}).get("pointer") or {}
    xml, many = int(pointer.get("xml_error", 0)), int(pointer.get("too_many_points", 0))
    scope = "all shapes" if summary.get("world_size", 1) == 1 else f"rank 0 of {summary['world_size']}"
    return {"views": xml + many, "xml_error": xml, "too_many_points": many, "scope": scope}


class KeypointJSONWriter(BasePredictionWriter):
    """Write ``<run folder>/<shape_id>.json`` for every shape as soon as its batch is predicted.

    The run folder is ``trainer.default_root_dir`` (module docstring: resume / refuse / overwrite).

    Args:
        on_existing: what to do when the folder already holds a run: "resume" (default; refused when
            the config hash differs), "refuse", or "overwrite" (delete that run's predictions first).
        save_views_png: also write ``<shape_id>_views.png`` (views + 2D points).
        save_shape_png: also write ``<shape_id>_shape.png`` (3D scatter + keypoints).
        summary: write ``summary_rank<r>.json`` at the end (counts, parse stats, timings, MLLM calls)
            and print where everything went.

    When PNGs are requested the writer asks the module (``keep_debug``) to keep the renders in its
    predictions; otherwise they are dropped in ``predict_step`` and never leave the device.
    """

    def __init__(
        self,
        on_existing: Literal["resume", "refuse", "overwrite"] = "resume",
        save_views_png: bool = False,
        save_shape_png: bool = False,
        summary: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if on_existing not in ("resume", "refuse", "overwrite"):
            raise ValueError(f"on_existing must be 'resume', 'refuse' or 'overwrite', got {on_existing!r}")
        self.on_existing = on_existing
        self.save_views_png, self.save_shape_png, self.summary = save_views_png, save_shape_png, summary
        self.output_dir: Path | None = None
        self.run_id: str | None = None
        self.config_hash: str | None = None
        self._manifest: dict[str, Any] = {}
        self._records: list[dict[str, Any]] = []
        self._skipped: list[str] = []
        self._started = 0.0
        self._finished = False

    # ------------------------------------------------------------------------------ run folder
    def _prepare_folder(self, run_dir: Path, settings: dict[str, Any]) -> tuple[str, str, list[str]]:
        """Rank 0: decide resume / refuse / overwrite; returns (run id, config hash, complete ids)."""
        digest = config_hash(settings)
        old = read_manifest(run_dir)
        existing = list(iter_prediction_files(run_dir)) if run_dir.is_dir() else []
        if old is None and existing:
            if self.on_existing != "overwrite":
                raise ZeroKeyRunError(
                    f"{run_dir} holds {len(existing)} prediction files but no {RUN_MANIFEST}: use a new "
                    "--trainer.default_root_dir, or on_existing: overwrite to delete them"
                )
        if old is not None and self.on_existing == "refuse" and existing:
            raise ZeroKeyRunError(
                f"{run_dir} already holds run {old.get('run_id')} ({len(existing)} shapes); on_existing is "
                "'refuse': use a new --trainer.default_root_dir"
            )
        if old is not None and self.on_existing == "resume":
            if old.get("config_hash") != digest:
                raise ZeroKeyRunError(
                    f"{run_dir} holds run {old.get('run_id')} made with other settings (config hash "
                    f"{old.get('config_hash')} != {digest}): use a new --trainer.default_root_dir, or "
                    "on_existing: overwrite to replace it"
                )
            done = [
                r["shape_id"]
                for _, r in existing
                if r.get("run_id") == old["run_id"] and r.get("status") == "complete"
            ]
            return str(old["run_id"]), digest, done
        if self.on_existing == "overwrite" and existing:
            for path, _ in existing:
                for extra in (
                    path,
                    path.with_name(path.stem + "_views.png"),
                    path.with_name(path.stem + "_shape.png"),
                ):
                    extra.unlink(missing_ok=True)
            for summary in run_dir.glob("summary_rank*.json"):
                summary.unlink()
            log.warning("on_existing=overwrite: deleted %d earlier predictions in %s", len(existing), run_dir)
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        return run_id, digest, []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # Before anything is written: a server that is down stops the run here.
        preflight = getattr(pl_module, "preflight", None)
        if callable(preflight):
            preflight()
        self.output_dir = Path(trainer.default_root_dir)
        settings_fn = getattr(pl_module, "method_settings", None)
        settings = settings_fn() if callable(settings_fn) else {"module": type(pl_module).__name__}
        decision = self._prepare_folder(self.output_dir, settings) if trainer.is_global_zero else None
        decision = trainer.strategy.broadcast(decision, src=0)
        self.run_id, self.config_hash, done = decision
        if hasattr(pl_module, "done_ids"):
            pl_module.done_ids = set(done)
        self._manifest = {
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "settings": settings,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "complete_before_start": len(done),
        }
        if trainer.is_global_zero:
            old = read_manifest(self.output_dir)
            if old is not None and old.get("run_id") == self.run_id:
                self._manifest["resumes"] = int(old.get("resumes", 0)) + 1
                self._manifest["first_started"] = old.get("first_started", old.get("started"))
            else:
                self._manifest["first_started"] = self._manifest["started"]
            write_json_atomic(self.output_dir / RUN_MANIFEST, self._manifest)
        if self.save_views_png or self.save_shape_png:
            pl_module.keep_debug = True
        self._records, self._skipped = [], []
        self._started = time.perf_counter()
        self._finished = False

    # ---------------------------------------------------------------------------------- writing
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: list[ShapePrediction],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.output_dir is not None, "KeypointJSONWriter.setup was not called"
        for pred in prediction:
            r = pred.record
            if r.get("status") == "skipped":  # complete in an earlier attempt of this run
                self._skipped.append(r["shape_id"])
                continue
            r["run_id"], r["config_hash"] = self.run_id, self.config_hash
            path = write_prediction(self.output_dir, r)
            if pred.views is not None and self.save_views_png:
                plot_views(pred, path.with_name(path.stem + "_views.png"))
            if pred.shape is not None and self.save_shape_png and r.get("keypoints") is not None:
                plot_shape(pred, path.with_name(path.stem + "_shape.png"))
            # Keep only the small numbers needed for the summary.
            keys = (
                "shape_id",
                "status",
                "error",
                "parse_stats",
                "timings",
                "mllm_calls",
                "keypoints",
                "missing",
            )
            self._records.append({k: r.get(k) for k in keys})
        budget = getattr(pl_module, "budget", None)
        if budget is not None and budget.exceeded:
            raise ZeroKeyRunError(f"stopping: {budget.reason()}")

    # ---------------------------------------------------------------------------------- summary
    def _summary(self, trainer: pl.Trainer, status: str, reason: str | None) -> dict[str, Any]:
        records = self._records
        ok = [r for r in records if r.get("status") == "complete"]
        failed = [r for r in records if r.get("status") != "complete"]
        stages = sorted({k for r in ok for k in (r.get("timings") or {})})
        calls = {
            key: int(sum((r.get("mllm_calls") or {}).get(key, 0) for r in records))
            for key in ("namer", "pointer")
        }
        failed_calls = {
            key: int(
                sum(((r.get("parse_stats") or {}).get(key) or {}).get("failed_calls", 0) for r in records)
            )
            for key in ("namer", "pointer")
        }
        return {
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "status": status,
            "reason": reason,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "output_dir": str(self.output_dir),
            "shapes_done": len(ok),
            "shapes_skipped_complete_before": len(self._skipped),
            "shapes_failed": len(failed),
            "failed_shapes": [{"shape_id": r["shape_id"], "error": r.get("error")} for r in failed],
            "keypoints": sum(len(r.get("keypoints") or []) for r in ok),
            "missing_names": sum(len(r.get("missing") or []) for r in ok),
            "mllm_calls": calls,
            "mllm_failed_calls": failed_calls,
            "parse_stats": {
                "namer": merge_parse_stats(records, "namer"),
                "pointer": merge_parse_stats(records, "pointer"),
            },
            "mllm_calls_per_shape": {k: (v / len(records) if records else 0.0) for k, v in calls.items()},
            "mean_seconds": {
                s: float(np.mean([(r.get("timings") or {}).get(s, 0.0) for r in ok])) for s in stages
            },
            "wall_seconds": round(time.perf_counter() - self._started, 2),
        }

    def _finish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str, reason: str | None
    ) -> None:
        if self.output_dir is None or self.run_id is None:
            return  # setup never got as far as choosing a run (e.g. the pre-flight check failed)
        self._finished = True
        summary = self._summary(trainer, status, reason)
        if self.summary:
            write_json_atomic(self.output_dir / f"summary_rank{trainer.global_rank}.json", summary)
        if trainer.is_global_zero:
            notes_fn = getattr(pl_module, "run_notes", None)
            notes = notes_fn() if callable(notes_fn) else []
            manifest = dict(
                self._manifest,
                status=status,
                reason=reason,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                notes=notes,
                dropped_views=dropped_views(summary),
            )
            write_json_atomic(self.output_dir / RUN_MANIFEST, manifest)
            if self.summary:
                self._print(summary, notes)

    @staticmethod
    def _print(summary: dict[str, Any], notes: list[str]) -> None:
        world = summary["world_size"]
        scope = f" (rank 0 of {world}; see summary_rank*.json)" if world > 1 else ""
        calls, failed = summary["mllm_calls"], summary["mllm_failed_calls"]
        lines = [
            f"zerokey: run {summary['run_id']} {summary['status']}{scope}: files in {summary['output_dir']}",
            f"  shapes: {summary['shapes_done']} done, {summary['shapes_skipped_complete_before']} skipped "
            f"(complete before), {summary['shapes_failed']} failed; {summary['keypoints']} keypoints",
            f"  MLLM calls: namer {calls['namer']} ({failed['namer']} failed), pointer {calls['pointer']} "
            f"({failed['pointer']} failed)",
        ]
        if summary["reason"]:
            label = "stopped" if summary["status"] == "aborted" else "why"
            lines.append(f"  {label}: {summary['reason']}")
        dropped = dropped_views(summary)
        if dropped["views"]:
            lines.append(
                f"  pointer answers dropped (view x name): {dropped['views']} "
                f"({dropped['xml_error']} not XML, {dropped['too_many_points']} with too many points)"
            )
        for shape in summary["failed_shapes"][:5]:
            lines.append(f"  failed {shape['shape_id']}: {shape['error']}")
        if len(summary["failed_shapes"]) > 5:
            lines.append(
                f"  ... {len(summary['failed_shapes']) - 5} more failed shapes in summary_rank0.json"
            )
        print("\n".join(lines + [f"  NOTE: {n}" for n in notes]), flush=True)

    def _verdict(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why a run that went to the end still failed, or None (counts summed over all ranks).

        A run fails when it predicted shapes and completed none, or when its failed MLLM calls exceed
        the budget's end-of-run rule (:class:`~zerokey.mllm.client.CallBudget`: the fraction of the
        calls made, at least one call tolerated). Shapes skipped as complete before count as neither.
        """
        budget = getattr(pl_module, "budget", None)
        done = sum(r.get("status") == "complete" for r in self._records)
        local = [done, len(self._records), budget.calls if budget else 0, budget.failed if budget else 0]
        total = trainer.strategy.reduce(
            torch.tensor(local, dtype=torch.float64, device=pl_module.device), reduce_op="sum"
        )
        done, attempted, calls, failed = (int(v) for v in total.tolist())
        if attempted and not done:
            first = next((r for r in self._records if r.get("status") != "complete"), None)
            why = f" (first: {first['shape_id']}: {first.get('error')})" if first else ""
            return f"no shape completed: {attempted} of {attempted} predicted shapes failed{why}"
        if budget is not None and budget.over_final_budget(calls, failed):
            return (
                f"{failed} of {calls} MLLM calls failed, over the budget "
                f"(max({budget.max_failed_fraction:.0%} of the calls, 1)); last error: {budget.last_error}"
            )
        return None

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reason = self._verdict(trainer, pl_module) if self.run_id is not None else None
        self._finish(trainer, pl_module, "failed" if reason else "finished", reason)
        if reason:
            raise ZeroKeyRunError(f"run failed: {reason}")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._finished:  # on_predict_end already wrote the verdict (and raised it)
            return
        self._finish(trainer, pl_module, "aborted", f"{type(exception).__name__}: {exception}")
