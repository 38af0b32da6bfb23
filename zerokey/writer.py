"""Streaming per-shape output: a ``BasePredictionWriter`` writing one JSON per shape as batches finish
(use ``trainer.predict(..., return_predictions=False)`` so nothing accumulates in memory), plus
optional PNGs of the views with their 2D points and of the shape with its 3D keypoints."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from zerokey.pipeline import ShapePrediction, merge_parse_stats

__all__ = ["KeypointJSONWriter", "prediction_path", "write_prediction", "plot_views", "plot_shape"]

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
    path = prediction_path(output_dir, record["shape_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


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
    if shape.faces is not None:  # meshes: area-weighted surface samples (vertices alone can be sparse)
        tri = xyz[shape.faces.detach().cpu().numpy()]
        area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        rng = np.random.default_rng(0)
        face = rng.choice(len(tri), max_points, p=area / area.sum()) if area.sum() > 0 else np.zeros(0, int)
        r1, r2 = np.sqrt(rng.random(len(face))), rng.random(len(face))
        xyz = (
            (1 - r1)[:, None] * tri[face, 0]
            + (r1 * (1 - r2))[:, None] * tri[face, 1]
            + (r1 * r2)[:, None] * tri[face, 2]
        )
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


class KeypointJSONWriter(BasePredictionWriter):
    """Write ``<output_dir>/<shape_id>.json`` for every shape as soon as its batch is predicted.

    Args:
        output_dir: where JSONs (and PNGs) go; created if needed.
        save_views_png: also write ``<shape_id>_views.png`` (views + 2D points).
        save_shape_png: also write ``<shape_id>_shape.png`` (3D scatter + keypoints).
        summary: write ``summary_rank<r>.json`` at the end (counts, parse stats, timings, MLLM calls).

    When PNGs are requested the writer asks the module (``keep_debug``) to keep the renders in its
    predictions; otherwise they are dropped in ``predict_step`` and never leave the device.
    """

    def __init__(
        self,
        output_dir: str,
        save_views_png: bool = False,
        save_shape_png: bool = False,
        summary: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.save_views_png, self.save_shape_png, self.summary = save_views_png, save_shape_png, summary
        self._records: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.save_views_png or self.save_shape_png:
            pl_module.keep_debug = True
        self._records = []

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
        for pred in prediction:
            path = write_prediction(self.output_dir, pred.record)
            if pred.views is not None and self.save_views_png:
                plot_views(pred, path.with_name(path.stem + "_views.png"))
            if pred.shape is not None and self.save_shape_png and pred.record.get("keypoints") is not None:
                plot_shape(pred, path.with_name(path.stem + "_shape.png"))
            # Keep only the small numbers needed for the summary.
            r = pred.record
            self._records.append(
                {
                    k: r.get(k)
                    for k in (
                        "shape_id",
                        "error",
                        "parse_stats",
                        "timings",
                        "mllm_calls",
                        "keypoints",
                        "missing",
                    )
                }
            )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.summary:
            return
        records = self._records
        ok = [r for r in records if not r.get("error")]
        stages = sorted({k for r in ok for k in (r.get("timings") or {})})
        summary = {
            "shapes": len(records),
            "failed_shapes": [
                {"shape_id": r["shape_id"], "error": r["error"]} for r in records if r.get("error")
            ],
            "keypoints": sum(len(r.get("keypoints") or []) for r in ok),
            "missing_names": sum(len(r.get("missing") or []) for r in ok),
            "parse_stats": {
                "namer": merge_parse_stats(ok, "namer"),
                "pointer": merge_parse_stats(ok, "pointer"),
            },
            "mllm_calls_per_shape": {
                key: float(np.mean([(r.get("mllm_calls") or {}).get(key, 0) for r in ok])) if ok else 0.0
                for key in ("namer", "pointer")
            },
            "mean_seconds": {
                s: float(np.mean([(r.get("timings") or {}).get(s, 0.0) for r in ok])) for s in stages
            },
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / f"summary_rank{trainer.global_rank}.json").write_text(
            json.dumps(summary, indent=1)
        )
        log.info(
            "zerokey: %d shapes written to %s (%d failed)",
            len(records),
            self.output_dir,
            len(summary["failed_shapes"]),
        )
