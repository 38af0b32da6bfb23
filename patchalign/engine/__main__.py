"""Command line of the data engine.

Examples::

    # everything for a directory of meshes (fused render -> teacher -> back-project per object)
    python -m patchalign shards build --meshes /data/meshes --work /scratch/work --out shards/mine

    # one stage at a time (each resumable), e.g. on a Slurm array (see slurm/shards_array.sh)
    python -m patchalign.engine index    --meshes /data/meshes --work W      # object list, once
    python -m patchalign.engine sample   --work W --num-chunks 64 --chunk-id 3
    python -m patchalign.engine views    --work W --num-chunks 64 --chunk-id 3
    python -m patchalign.engine labels   --work W --num-chunks 64 --chunk-id 3
    python -m patchalign.engine textbank --work W --out shards/mine
    python -m patchalign.engine write    --work W --out shards/mine

    # Find3D data-engine output (points, renders, masks) instead of meshes
    python -m patchalign shards build --find3d /data/find3d/labeled --work W --out shards/find3d

    # the built-in procedural demo (train / val / heldout + one text bank)
    python -m patchalign.engine demo --out shards/demo --n-objects 300
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchalign.engine.build import (
    STAGES,
    EngineConfig,
    StageStats,
    WorkDir,
    chunk_records,
    config_from_dict,
    discover_meshes,
    load_records,
    run_build,
    save_records,
)
from patchalign.engine.sources.find3d import find3d_records

# The CLI-settable engine settings: every EngineConfig field but ``progress`` (--no-progress).
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "progress")


def _flag_type(annotation: str) -> tuple[Callable[[str], Any], bool]:
    """(parser of one value, takes several values) for an EngineConfig annotation string."""
    base = annotation.replace(" | None", "")
    if base.startswith("tuple["):
        return str, True
    return {"int": int, "float": float, "str": str}[base], False


def _config_args(p: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` flag per :class:`EngineConfig` field, with its type, choices and help
    taken from the dataclass (defaults stay the dataclass's: an unset flag is not passed on)."""
    g = p.add_argument_group("engine settings (defaults: EngineConfig; demo: DEMO_CONFIG)")
    for f in dataclasses.fields(EngineConfig):
        if f.name not in CONFIG_KEYS:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {f.default!r})"
        if f.type == "bool":
            g.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        parse, several = _flag_type(str(f.type))
        g.add_argument(
            flag,
            type=parse,
            nargs="+" if several else None,
            choices=f.metadata.get("choices"),
            help=help_text,
        )
    g.add_argument(
        "--released-teacher",
        action="store_true",
        help="all released teacher settings: 518 px bicubic resize + centre crop, bicubic upsampling, "
        "per-view averaging, 20-neighbour fill, Find3D raw frame (explicit flags still win)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the per-object stages (default 1; demo: #CPUs)",
    )


def _common(p: argparse.ArgumentParser, needs_out: bool, sources: bool) -> None:
    p.add_argument("--work", required=True, type=Path, help="work directory with the per-object caches")
    if needs_out:
        p.add_argument("--out", required=True, type=Path, help="output directory of the shard sets")
    if sources:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--meshes", type=Path, help="directory of .glb/.obj/.ply meshes (recursive)")
        src.add_argument("--find3d", type=Path, help="Find3D data root (points/, rendered/, split/)")
        p.add_argument("--val-fraction", type=float, default=0.0, help="uid-hashed share of meshes -> val")
    p.add_argument("--num-chunks", type=int, default=1, help="split the objects into this many chunks")
    p.add_argument("--chunk-id", type=int, default=0, help="process only this chunk (Slurm array index)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _config_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m patchalign.engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="only write the object list WORK/objects.jsonl (from --meshes/--find3d)")
    p.add_argument("--work", required=True, type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--meshes", type=Path)
    src.add_argument("--find3d", type=Path)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--log-level", default="INFO")
    helps = {
        "sample": "sample surface points with face ids (writes the object list from --meshes/--find3d)",
        "render": "render views, keep pix_to_face",
        "features": "teacher patch features of the renders",
        "backproject": "per-point features from features + renders",
        "views": "render + features + backproject fused in memory (no large caches)",
        "labels": "per-point part membership (demo faces / Find3D masks)",
        "textbank": "encode all part names into OUT/text_bank.safetensors",
        "write": "write the shard sets OUT/<split>/",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p, needs_out=name in ("textbank", "write"), sources=name == "sample")
    p = sub.add_parser("build", help="run several stages (default: all, fused)")
    _common(p, needs_out=True, sources=True)
    p.add_argument(
        "--stages",
        default="sample,views,labels,textbank,write",
        help=f"comma-separated subset of {','.join(STAGES)} "
        "(render,features,backproject instead of views keeps every cache)",
    )
    p = sub.add_parser("demo", help="build the procedural demo shard sets (train/val/heldout)")
    p.add_argument("--out", type=Path, default=Path("shards/demo"))
    p.add_argument("--work", type=Path, default=None, help="default: OUT/work")
    p.add_argument("--n-objects", type=int, default=300)
    p.add_argument("--demo-seed", type=int, default=0, help="generator seed offset")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--no-progress", action="store_true")
    _config_args(p)
    return parser


def _summary(results: dict[str, StageStats], wall: float, n_objects: int) -> str:
    lines = [str(s) for s in results.values()]
    lines.append(f"total {wall:.1f}s for {n_objects} objects ({n_objects / max(wall, 1e-9):.2f} obj/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k, None) is not None}
    if getattr(args, "released_teacher", False):
        from patchalign.engine.build import RELEASED_TEACHER_SETTINGS

        overrides = {**RELEASED_TEACHER_SETTINGS, **overrides}
    overrides["progress"] = not getattr(args, "no_progress", False)
    t0 = time.perf_counter()
    if args.command == "demo":
        from patchalign.engine.sources.demo import build_demo

        results = build_demo(
            str(args.out), args.n_objects, args.demo_seed, args.work, workers=args.workers, **overrides
        )
        print(_summary(results, time.perf_counter() - t0, args.n_objects))
        return 0

    cfg = config_from_dict(overrides)
    work = WorkDir(args.work)
    if getattr(args, "meshes", None) is not None:
        records = discover_meshes(args.meshes, args.val_fraction)
        save_records(work.records_path, records)
    elif getattr(args, "find3d", None) is not None:
        records = find3d_records(args.find3d)
        save_records(work.records_path, records)
    else:
        records = load_records(work.records_path)
    if args.command == "index":
        splits = {s: sum(r.split == s for r in records) for s in sorted({r.split for r in records})}
        print(f"{len(records)} objects {splits} -> {work.records_path}")
        return 0
    chunk = chunk_records(records, args.num_chunks, args.chunk_id)
    stages = args.stages.split(",") if args.command == "build" else [args.command]
    results = run_build(
        chunk,
        work,
        cfg,
        getattr(args, "out", None),
        stages=stages,
        all_records=records,
        workers=args.workers or 1,
    )
    print(_summary(results, time.perf_counter() - t0, len(chunk)))
    failed = sum(s.failed for s in results.values())
    if failed:
        print(f"{failed} object-stage failures, see {work.failures_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
