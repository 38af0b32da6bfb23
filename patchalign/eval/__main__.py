"""Script path of the zero-shot evaluation (no Lightning).

::

    python -m patchalign.eval --model exported/ --dataset shapenetpart \\
        --root /datasets/shapenetcore_partanno_segmentation_benchmark_v0_normal --out results/snp

Text embeddings come from ``--text-bank`` (a saved :class:`~patchalign.data.textbank.TextBank`),
``--text-encoder`` (a ``patchalign.text`` spec), or by default the text encoder recorded in the export.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import get_args

import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from patchalign.eval.evaluator import run_zero_shot_eval
from patchalign.eval.readers import DatasetKind, build_dataset
from patchalign.text import PROMPT_TEMPLATES


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(
        prog="python -m patchalign.eval", description="Zero-shot part-segmentation evaluation."
    )
    p.add_argument("--config", action=ActionConfigFile, help="the options below from a YAML file")
    p.add_argument("--model", required=True, help="directory written by `patchalign export`")
    p.add_argument("--dataset", required=True, choices=list(get_args(DatasetKind)))
    p.add_argument("--root", required=True, help="benchmark root directory")
    p.add_argument("--split", default="test")
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--part-names", default="patchalign3d", choices=["patchalign3d", "find3d"])
    p.add_argument("--templates", default=None, choices=list(PROMPT_TEMPLATES), help="default: the export's")
    p.add_argument("--assign", default="nearest", choices=["nearest", "knn", "membership"])
    p.add_argument("--knn", type=int, default=3)
    p.add_argument("--none-threshold", type=float, default=None, help="0.0 = Find3D's 'no part' rule")
    p.add_argument("--num-points", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--text-bank", default=None)
    p.add_argument("--text-encoder", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action=ActionYesNo, default=False, help="bf16 autocast on CUDA")
    p.add_argument("--out", default=None, help="write results.csv / results.json (and pictures) here")
    p.add_argument("--viz-per-category", type=int, default=0)
    p.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace earlier results in --out")
    p.add_argument(
        "--benchmark",
        default="auto",
        help="talk row printed beside ours (a patchalign.eval.references key); "
        "auto: from --dataset/--split; none: no row",
    )
    args = p.parse_args(argv)
    if args.out and (Path(args.out) / "results.json").exists() and not args.overwrite:
        sys.stderr.write(
            f"patchalign.eval: error: {args.out} already holds results.json: "
            "pass --overwrite or another --out\n"
        )
        raise SystemExit(2)
    from patchalign.eval.references import get_reference, reference_key_for

    benchmark = (
        reference_key_for(args.dataset, args.split)
        if args.benchmark == "auto"
        else None
        if args.benchmark == "none"
        else args.benchmark
    )
    if benchmark is not None:
        try:
            get_reference(benchmark)
        except ValueError as err:
            p.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from patchalign.checkpoints import CheckpointError
    from patchalign.pretrained import load_pretrained

    try:
        model = load_pretrained(args.model, device=args.device)
    except (FileNotFoundError, CheckpointError) as err:
        sys.stderr.write(f"patchalign.eval: error: {err}\n")
        raise SystemExit(2) from None
    if args.text_bank:
        from patchalign.data.textbank import load_text_bank

        text = load_text_bank(args.text_bank)
    else:
        from patchalign.text import load_text_encoder

        spec = args.text_encoder or model.text_encoder_id
        if not spec:
            p.error("the export records no text encoder: pass --text-encoder or --text-bank")
        text = load_text_encoder(spec)
    if not Path(args.root).exists():
        sys.stderr.write(f"patchalign.eval: error: --root {args.root}: no such file or directory\n")
        raise SystemExit(2)
    dataset = build_dataset(args.dataset, args.root, args.split, args.categories, args.part_names)
    run_zero_shot_eval(
        model,
        dataset,
        text,
        batch_size=args.batch_size,
        num_points=args.num_points,
        seed=args.seed,
        templates=args.templates or model.templates,
        assign=args.assign,
        knn=args.knn,
        none_threshold=args.none_threshold,
        device=args.device,
        num_workers=args.num_workers,
        amp=args.amp,
        out_dir=args.out,
        viz_per_category=args.viz_per_category,
        benchmark=benchmark,
    )


if __name__ == "__main__":
    main()
