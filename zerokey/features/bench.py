"""Bench rows for the PatchAlign3D-feature keypoint detectors (:mod:`zerokey.features.pipeline`).

On the KeypointNet shapes beside the checkout (``<root>/pcds``: the point clouds the annotations
index into), one row per detector, each with IoU at 0.01 / 0.05 / 0.10 (geodesic thresholds, the
KeypointNet protocol of :mod:`zerokey.evaluate`), seconds per shape (after one warm-up shape) and
MLLM calls per shape:

* ``patchalign zero-shot``: KeypointNet's semantic names, peaks of the text-similarity fields;
* ``patchalign few-shot K=k``: leave-one-out over the shapes of the category here (each query's
  support = the first ``k`` *other* shapes, sorted by model id);
* ``unified (oracle)``: feature proposals + the OraclePointer asked only in ``views_per_name`` views
  per name, next to ``zerokey (oracle)``: the same oracle in all 26 views. The oracle projects the
  ground truth into each view where it passes a depth test, then adds Gaussian pixel noise
  (``noise_px``), drops answers (``dropout``) and replaces some by random foreground pixels
  (``outlier_rate``), seeded per shape.

The encoder is whatever export or released checkpoint ``--model`` names (``make demo`` writes one
to ``outputs/demo/export``: trained on procedural shapes, so its numbers say nothing about the paper's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from zerokey.cli import run_function_cli
from zerokey.data import KeypointNetDataset, load_keypointnet_annotations
from zerokey.evaluate import evaluate_predictions
from zerokey.features.pipeline import FewShotFeatureKeypoints, UnifiedKeypoints, ZeroShotFeatureKeypoints
from zerokey.mllm.namers import KeypointNetNamer
from zerokey.mllm.pointers import OraclePointer
from zerokey.pipeline import KeypointDetector, ZeroKeyPipeline
from zerokey.views import ViewConfig

__all__ = ["feature_rows", "format_rows", "feature_bench", "main"]

THRESHOLDS = (0.01, 0.05, 0.10)


def _mllm_calls(record: dict) -> int:
    """The MLLM requests a record says its detector made."""
    return sum(record.get("mllm_calls", {}).get(k, 0) for k in ("namer", "pointer"))


def _run(
    label: str,
    detector: KeypointDetector,
    dataset: KeypointNetDataset,
    annotations: dict,
    root: Path,
    device: torch.device,
    calls_of: Callable[[dict], int] = _mllm_calls,
) -> dict:
    records, seconds = [], []
    for i in range(len(dataset)):
        shape = dataset[i]
        start = time.perf_counter()
        records.append(detector.predict(shape, device).record)
        if i > 0 or len(dataset) == 1:  # the first shape pays for model / text-encoder loading
            seconds.append(time.perf_counter() - start)
    result = evaluate_predictions(records, annotations, root / "pcds", thresholds=THRESHOLDS)
    calls = [calls_of(r) for r in records]
    return {
        "row": label,
        "iou": dict(
            zip([f"{t:.2f}" for t in THRESHOLDS], [round(v, 4) for v in result.mean_iou], strict=True)
        ),
        "seconds_per_shape": round(sum(seconds) / max(len(seconds), 1), 4),
        "mllm_calls_per_shape": round(sum(calls) / max(len(calls), 1), 2),
        "shapes": sum(result.shapes.values()),
    }


def feature_rows(
    model: str,
    root: str | Path,
    category: str = "airplane",
    shots: Sequence[int] = (1, 5),
    noise_px: float = 2.0,
    dropout: float = 0.1,
    outlier_rate: float = 0.05,
    image_size: int = 224,
    views_per_name: int = 3,
    limit: int | None = None,
) -> list[dict]:
    """One row per detector (see the module docstring) on ``category``'s shapes under ``root``."""
    root = Path(root)
    dataset = KeypointNetDataset(root, [category], use_mesh=False, limit=limit)
    annotations = load_keypointnet_annotations(sorted((root / "annotations").glob("*.json")))
    namer = KeypointNetNamer(str(root / "semantic_names.json"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    views = ViewConfig(image_size=image_size)
    oracle = OraclePointer(noise_px, dropout, outlier_rate, seed=0)
    detectors: list[tuple[str, KeypointDetector]] = [
        ("patchalign zero-shot", ZeroShotFeatureKeypoints(model, namer))
    ]
    detectors += [
        (
            f"patchalign few-shot K={k}",
            FewShotFeatureKeypoints(model, str(root), shots=k, support_split=None, exclude_query=True),
        )
        for k in shots
    ]
    detectors.append(
        (
            "unified (oracle)",
            UnifiedKeypoints(model, namer, oracle, views=views, views_per_name=views_per_name),
        )
    )
    rows = [_run(label, det, dataset, annotations, root, device) for label, det in detectors]
    # full ZeroKey asks once per (view, name); the oracle itself makes no network call
    rows.append(
        _run(
            "zerokey (oracle)",
            ZeroKeyPipeline(namer, oracle, views),
            dataset,
            annotations,
            root,
            device,
            calls_of=lambda r: r["counts"]["views"] * len(r["names"]),
        )
    )
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'detector':<26} {'IoU@0.01':>9} {'IoU@0.05':>9} {'IoU@0.10':>9} {'s/shape':>8} {'calls/shape':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        i = r["iou"]
        lines.append(
            f"{r['row']:<26} {i['0.01']:>9.4f} {i['0.05']:>9.4f} {i['0.10']:>9.4f} "
            f"{r['seconds_per_shape']:>8.3f} {r['mllm_calls_per_shape']:>11.1f}"
        )
    return "\n".join(lines)


def feature_bench(
    model: str = "outputs/demo/export",
    root: str = "../shared/data/keypointnet",
    category: str = "airplane",
    shots: list[int] = [1, 5],  # noqa: B006 - jsonargparse reads the default from the signature
    noise_px: float = 2.0,
    dropout: float = 0.1,
    outlier_rate: float = 0.05,
    image_size: int = 224,
    views_per_name: int = 3,
    limit: int | None = None,
    json_out: str | None = None,
) -> list[dict]:
    """The PatchAlign3D-feature keypoint rows (``python -m zerokey.features.bench``).

    Args:
        model: PatchAlign3D export dir or released checkpoint.
        root: KeypointNet root (annotations/, pcds/, semantic_names.json).
        category: KeypointNet category to run on.
        shots: support-set sizes for the few-shot rows (leave-one-out).
        noise_px / dropout / outlier_rate: the oracle pointer's noise model.
        image_size: rendered view size for the pointer rows.
        views_per_name: views the unified detector asks the pointer in, per name.
        limit: at most this many shapes.
        json_out: also write the rows as JSON here.
    """
    if not Path(model).exists():
        raise SystemExit(
            f"model {model} not found: run `make demo` (writes outputs/demo/export) or pass --model"
        )
    if not (Path(root) / "annotations").is_dir():
        raise SystemExit(f"KeypointNet data not found at {root}: pass --root")
    rows = feature_rows(
        model, root, category, shots, noise_px, dropout, outlier_rate, image_size, views_per_name, limit
    )
    print(f"model: {model}; oracle noise {noise_px}px, dropout {dropout}, outliers {outlier_rate}")
    print(format_rows(rows))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """``python -m zerokey.features.bench ...`` (flags: :func:`feature_bench`'s parameters)."""
    return run_function_cli(feature_bench, argv, "python -m zerokey.features.bench")


if __name__ == "__main__":
    main()
