"""Evaluation benchmark: end-to-end zero-shot throughput and per-shape inference latency.

``python -m patchalign bench eval [--shapes 2874] [--batch-size 32] [--num-workers 2]``

1. **Throughput.** Builds a ShapeNetPart directory in the official txt layout with as many shapes as
   the real test split (2874, same uids and categories as ``shuffled_test_file_list.json``) from the
   real shapes beside the checkout (the raw ShapeNetPart txt shapes and the grid-sampled Cap shapes),
   each resampled to 2400-3000 points and jittered, labels mapped into the target category's part
   range. Then times ``run_zero_shot_eval`` from the reader's construction (file listing) to the
   final metric with a randomly initialised full-size encoder (22 M parameters) and random text
   embeddings of the released part names: shapes/s. The data pipeline alone is timed too, to show
   whether the model or the files bound the run.
2. **Latency.** Exports the same random model with :func:`patchalign.tools.export.export_checkpoint`,
   loads it with :func:`patchalign.pretrained.load_pretrained` and times ``segment`` on one
   2048-point shape (median over runs, after warm-up).

Numbers depend on the machine; the JSON printed at the end records it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchalign.argv import cli_main
from patchalign.eval.protocol import ResampledDataset, collate_part_samples
from patchalign.eval.readers.shapenetpart import (
    PATCHALIGN3D_SHAPENETPART_PARTS,
    SHAPENETPART_NUM_PARTS,
    SHAPENETPART_PART_START,
    SHAPENETPART_SYNSETS,
    ShapeNetPartTxt,
)
from patchalign.tools.paths import SHARED_DATA

DATA = SHARED_DATA / "shapenetpart"


def _source_shapes(data_root: Path) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Real shapes as ``(xyz+normals (n, 6), local labels (n,), num_parts)``."""
    raw = data_root / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    synset_cat = {v: k for k, v in SHAPENETPART_SYNSETS.items()}
    out = []
    for f in sorted(raw.glob("*/*.txt")):
        cat = synset_cat[f.parent.name]
        a = np.loadtxt(f, dtype=np.float32)
        out.append(
            (a[:, :6], a[:, 6].astype(np.int64) - SHAPENETPART_PART_START[cat], SHAPENETPART_NUM_PARTS[cat])
        )
    for f in sorted((data_root / "cap_gridsampled").glob("*.txt")):
        a = np.loadtxt(f, dtype=np.float32)  # x y z nx ny nz label origin_id; labels 6-7 (Cap)
        out.append((a[:, :6], a[:, 6].astype(np.int64) - SHAPENETPART_PART_START["Cap"], 2))
    if not out:
        raise FileNotFoundError(f"no source shapes under {data_root}")
    return out


def build_benchmark_split(
    out_root: Path, data_root: Path = DATA, num_shapes: int | None = None, seed: int = 0
) -> Path:
    """Write a ShapeNetPart-layout directory whose test split has the real split's uids (first
    ``num_shapes`` of them), filled from the real source shapes. Returns the root."""
    raw = data_root / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    entries = json.loads((raw / "train_test_split" / "shuffled_test_file_list.json").read_text())
    entries = entries[:num_shapes] if num_shapes else entries
    sources = _source_shapes(data_root)
    rng = np.random.default_rng(seed)
    split_dir = out_root / "train_test_split"
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "shuffled_test_file_list.json").write_text(json.dumps(entries))
    for s in ("train", "val"):
        (split_dir / f"shuffled_{s}_file_list.json").write_text("[]")
    (out_root / "synsetoffset2category.txt").write_text(
        "".join(f"{c}\t{s}\n" for c, s in SHAPENETPART_SYNSETS.items())
    )
    synset_cat = {v: k for k, v in SHAPENETPART_SYNSETS.items()}
    for i, entry in enumerate(entries):
        synset, shape_id = entry.split("/")[-2:]
        cat = synset_cat[synset]
        feats, local, k_src = sources[i % len(sources)]
        n = int(rng.integers(2400, 3001))
        idx = rng.choice(feats.shape[0], n, replace=feats.shape[0] < n)
        rows = feats[idx].copy()
        rows[:, :3] += rng.normal(0, 0.005, (n, 3)).astype(np.float32)
        labels = SHAPENETPART_PART_START[cat] + local[idx] % SHAPENETPART_NUM_PARTS[cat]
        table = np.concatenate([rows, labels[:, None].astype(np.float32)], axis=1)
        (out_root / synset).mkdir(exist_ok=True)
        text = ("%.6f %.6f %.6f %.6f %.6f %.6f %.6f\n" * n) % tuple(table.ravel().tolist())
        (out_root / synset / f"{shape_id}.txt").write_text(text)
    return out_root


def random_text_bank(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = sorted({n for v in PATCHALIGN3D_SHAPENETPART_PARTS.values() for n in v})
    return {n: torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0) for n in names}


def time_data_pipeline(root: Path, batch_size: int, num_workers: int) -> float:
    """Shapes/s of files -> normalised, sampled, collated batches (no model)."""
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    ds = ResampledDataset(ShapeNetPartTxt(root, "test"), 2048, 0)
    n = 0
    for batch in DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_part_samples
    ):
        n += batch["points"].shape[0]
    return n / (time.perf_counter() - start)


def time_latency(model_dir: Path, device: torch.device, runs: int, head_dim: int) -> dict[str, float]:
    from patchalign.pretrained import load_pretrained

    t0 = time.perf_counter()
    model = load_pretrained(model_dir, device=device)
    load_s = time.perf_counter() - t0
    pts = torch.rand(2048, 3) * 2 - 1
    text = torch.nn.functional.normalize(torch.randn(4, head_dim), dim=1)
    times = []
    for i in range(runs + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        model.segment(pts, text)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {
        "load_s": load_s,
        "latency_ms_median": 1000 * statistics.median(times),
        "latency_ms_min": 1000 * min(times),
    }


def eval_bench(
    shapes: int = 2874,
    batch_size: int = 32,
    num_workers: int = min(4, os.cpu_count() or 1),
    device: str | None = None,
    latency_runs: int = 20,
    amp: bool = False,
    data: str = str(DATA),
    workdir: str | None = None,
) -> dict:
    """Zero-shot evaluation benchmark: end-to-end shapes/s and load_pretrained + segment latency.

    Args:
        shapes: shapes in the synthetic test split (the real split has 2874).
        batch_size: evaluation batch size.
        num_workers: data loader workers.
        device: torch device (default: cuda if available, else cpu).
        latency_runs: timed segment calls (after 3 warm-up calls).
        amp: bf16 autocast on CUDA.
        data: directory with the real ShapeNetPart shapes the split is built from.
        workdir: build the split here (default: a temp dir, deleted).

    Returns:
        The printed results (machine, throughput, latency).
    """
    from patchalign.eval.evaluator import run_zero_shot_eval
    from patchalign.model import EncoderConfig, PatchAlignEncoder
    from patchalign.tools.export import export_checkpoint

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    cfg = EncoderConfig()
    encoder = PatchAlignEncoder(cfg).eval()
    bank = random_text_bank(cfg.head_dim)
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
        },
        "encoder_parameters": encoder.num_parameters(),
    }
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        root = build_benchmark_split(tmp / "shapenetpart", Path(data), shapes)
        results["build_split_s"] = time.perf_counter() - t
        results["data_pipeline_shapes_per_s"] = time_data_pipeline(root, batch_size, num_workers)
        t = time.perf_counter()
        report = run_zero_shot_eval(
            encoder,
            ShapeNetPartTxt(root, "test"),
            bank,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            amp=amp,
            verbose=False,
        )
        total = time.perf_counter() - t
        results["eval"] = {
            "shapes": report.info["num_shapes"],
            "batch_size": batch_size,
            "num_workers": num_workers,
            "seconds": total,
            "shapes_per_s": report.info["num_shapes"] / total,
            "released/instance_mIoU (random model)": report.scalars["released/instance_mIoU"],
        }
        sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        torch.save(
            {"state_dict": sd, "hyper_parameters": {"encoder_config": cfg.to_dict()}}, tmp / "random.ckpt"
        )
        export_checkpoint(tmp / "random.ckpt", tmp / "export")
        results["latency"] = time_latency(tmp / "export", device, latency_runs, cfg.head_dim)
    print(json.dumps(results, indent=2))
    return results


main = cli_main(eval_bench, "python -m patchalign bench eval")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
