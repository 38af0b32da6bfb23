"""``python -m zerokey bench``: per-stage timing and KeypointNet IoU with the OraclePointer.

What it measures, on the real KeypointNet shapes under ``../shared/data/keypointnet`` (or ``--root``):

* seconds per shape for render / lift / cluster (the non-MLLM work; CPU: Embree for meshes, torch
  splatting for point clouds) after one warm-up shape;
* MLLM calls per shape -- measured for the pointer used, and what each real pointer would need;
* IoU@thresholds of the OraclePointer's predictions (ground truth projected into the views with the
  given pixel noise / dropout / outliers) under the KeypointNet protocol (:mod:`zerokey.evaluate`).

``--pointer server`` runs the same oracle answers through the real HTTP path: a local
OpenAI-compatible stand-in server answers each view's all-names request in Molmo's point format, and
:class:`OpenAIPointer` parses it -- so the numbers include request encoding and answer parsing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from zerokey.cluster import ClusterConfig
from zerokey.data import KeypointNetDataset, ShapeSample, default_data_root, load_keypointnet_annotations
from zerokey.evaluate import evaluate_predictions
from zerokey.namers import KeypointNetNamer
from zerokey.pipeline import ZeroKeyPipeline
from zerokey.pointers import OpenAIPointer, OraclePointer, Pointer, Points2D
from zerokey.testing import FakeChatServer
from zerokey.views import RenderedViews, ViewConfig
from zerokey.writer import write_prediction

__all__ = ["run_bench", "main", "OracleServerPointer"]


def _image_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    # Same conversion as zerokey.openai_client.encode_png_base64 (PNG is lossless, so the server
    # decodes exactly these bytes).
    return (np.clip(image.detach().cpu().numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def molmo_answer(points: Points2D, view: int, names: list[str], size: int) -> str:
    """The oracle's points of one view written the way Molmo answers (percent, one decimal)."""
    parts = []
    for i, name in enumerate(names):
        sel = (points.view == view) & (points.name_index == i)
        uv = (points.uv[sel] / size * 100.0).tolist()
        if not uv:
            continue
        if len(uv) == 1:
            parts.append(f'<point x="{uv[0][0]:.1f}" y="{uv[0][1]:.1f}" alt="{name}">{name}</point>')
        else:
            coords = " ".join(f'x{j + 1}="{x:.1f}" y{j + 1}="{y:.1f}"' for j, (x, y) in enumerate(uv))
            parts.append(f'<points {coords} alt="{name}">{name}</points>')
    return " ".join(parts) if parts else "There are none."


class OracleServerPointer(Pointer):
    """Oracle answers served over HTTP: a :class:`FakeChatServer` recognises each view by its pixels
    and answers with the oracle's points in Molmo format; an :class:`OpenAIPointer` asks and parses."""

    def __init__(self, oracle: OraclePointer, server: FakeChatServer, max_workers: int = 8) -> None:
        self.oracle = oracle
        self.answers: dict[str, str] = {}
        server.answer = lambda request: self.answers.get(_image_key(request.images[0]), "no such image")
        self.client_pointer = OpenAIPointer(
            server.base_url, "oracle", api_key_env=None, max_workers=max_workers
        )

    def __call__(self, shape: ShapeSample, names: list[str], views: RenderedViews) -> Points2D:
        truth = self.oracle(shape, names, views)
        self.answers = {
            _image_key(_to_uint8(views.images[v])): molmo_answer(truth, v, names, views.image_size)
            for v in range(views.n_views)
        }
        return self.client_pointer(shape, names, views)


def run_bench(
    root: Path,
    out_dir: Path,
    noise_px: float = 2.0,
    dropout: float = 0.1,
    outlier_rate: float = 0.05,
    image_size: int = 448,
    patch_size: int = 5,
    pointer: str = "oracle",
    seed: int = 0,
    thresholds: Sequence[float] = (0.01, 0.05, 0.10),
    cluster: ClusterConfig | None = None,
) -> dict:
    torch.manual_seed(seed)
    dataset = KeypointNetDataset(root)
    oracle = OraclePointer(noise_px=noise_px, dropout=dropout, outlier_rate=outlier_rate, seed=seed)
    server = FakeChatServer(lambda request: "") if pointer == "server" else None
    if server is not None:
        server.__enter__()
    try:
        chosen: Pointer = OracleServerPointer(oracle, server) if server is not None else oracle
        pipeline = ZeroKeyPipeline(
            KeypointNetNamer(),
            chosen,
            ViewConfig(image_size=image_size),
            patch_size,
            cluster=cluster or ClusterConfig(),
        )
        pipeline.predict(dataset[0])  # warm-up: imports, hdbscan/numba compilation, allocator
        records = []
        wall = []
        for i in range(len(dataset)):
            shape = dataset[i]
            start = time.perf_counter()
            record = pipeline.predict(shape).record
            wall.append(time.perf_counter() - start)
            write_prediction(out_dir, record)
            records.append(record)
    finally:
        if server is not None:
            server.__exit__(None, None, None)

    annotations = load_keypointnet_annotations(sorted((root / "annotations").glob("*.json")))
    result = evaluate_predictions(records, annotations, root / "pcds", thresholds)
    stages = ("render", "name", "point", "lift", "cluster")
    per_stage = {s: float(np.mean([r["timings"][s] for r in records])) for s in stages}
    cpu_stage = {s: float(np.mean([r["cpu_seconds"][s] for r in records])) for s in stages}
    non_mllm = [r["timings"]["render"] + r["timings"]["lift"] + r["timings"]["cluster"] for r in records]
    kinds = {"mesh": [], "points": []}
    for r, t in zip(records, non_mllm, strict=True):
        kinds["mesh" if r["source"].endswith((".ply", ".obj", ".glb")) else "points"].append(t)
    n_names = float(np.mean([len(r["names"]) for r in records]))
    n_views = records[0]["counts"]["views"]
    pstats = {}
    for r in records:
        for k, v in r["parse_stats"]["pointer"].items():
            pstats[k] = pstats.get(k, 0) + v
    return {
        "shapes": len(records),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "image_size": image_size,
        "views": n_views,
        "pointer": pointer,
        "oracle": {"noise_px": noise_px, "dropout": dropout, "outlier_rate": outlier_rate, "seed": seed},
        "cluster": vars(pipeline.cluster_config),
        "seconds_per_shape": per_stage,
        "cpu_seconds_per_shape (all threads)": cpu_stage,
        "non_mllm_seconds_per_shape": {
            "mean": float(np.mean(non_mllm)),
            "max": float(np.max(non_mllm)),
            **{f"mean_{k}": float(np.mean(v)) for k, v in kinds.items() if v},
        },
        "wall_seconds_per_shape": float(np.mean(wall)),
        "mllm_calls_per_shape": {
            "measured_pointer": float(np.mean([r["mllm_calls"]["pointer"] for r in records])),
            "measured_namer": float(np.mean([r["mllm_calls"]["namer"] for r in records])),
            "openai_all_names (1 per view)": n_views,
            "openai_per_name (views x names)": n_views * n_names,
            "molmo_in_process (generate batches of 8, x names)": math.ceil(n_views / 8) * n_names,
            "namer (OpenAINamer)": 1,
        },
        "pointer_parse_stats": pstats,
        "iou": {f"{t:.2f}": round(result.at(t), 4) for t in thresholds},
        "iou_per_class": {
            c: {f"{t:.2f}": round(v[i], 4) for i, t in enumerate(result.thresholds)}
            for c, v in result.iou.items()
        },
        "unreachable_pairs": result.unreachable_pairs,
        "output_dir": str(out_dir),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m zerokey bench", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(default_data_root() / "keypointnet"))
    parser.add_argument("--out", default=None, help="where to write predictions (default: a temp dir)")
    parser.add_argument("--noise-px", type=float, default=2.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--outlier-rate", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--patch-size", type=int, default=5)
    parser.add_argument("--pointer", choices=["oracle", "server"], default="oracle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-samples", type=int, default=ClusterConfig.min_samples)
    parser.add_argument("--min-cluster-size", type=int, default=ClusterConfig.min_cluster_size)
    parser.add_argument("--epsilon", type=float, default=ClusterConfig.cluster_selection_epsilon)
    parser.add_argument("--min-views", type=int, default=ClusterConfig.min_views)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"KeypointNet data not found at {root}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        result = run_bench(
            root,
            out,
            args.noise_px,
            args.dropout,
            args.outlier_rate,
            args.image_size,
            args.patch_size,
            args.pointer,
            args.seed,
            cluster=ClusterConfig(
                args.min_samples,
                args.min_cluster_size,
                cluster_selection_epsilon=args.epsilon,
                min_views=args.min_views,
            ),
        )
    print(json.dumps(result, indent=1))
    return result
