"""Command line of the data engine (jsonargparse; every engine flag comes from :class:`EngineConfig`).

Examples::

    # everything for a directory of meshes (fused render -> teacher -> back-project per object)
    python -m patchalign shards build --meshes /data/meshes --work /scratch/work --out shards/mine

    # one stage at a time (each resumable), e.g. on a Slurm array (see slurm/shards_array.sh)
    python -m patchalign shards index    --meshes /data/meshes --work W      # object list, once
    python -m patchalign shards sample   --work W --num-chunks 64 --chunk-id 3
    python -m patchalign shards views    --work W --num-chunks 64 --chunk-id 3
    python -m patchalign shards labels   --work W --num-chunks 64 --chunk-id 3
    python -m patchalign shards textbank --work W --out shards/mine
    python -m patchalign shards write    --work W --out shards/mine

    # Find3D data-engine output (points, renders, masks) instead of meshes
    python -m patchalign shards build --find3d /data/find3d/labeled --work W --out shards/find3d

    # the built-in procedural demo (train / val / heldout / unseen_names + one text bank)
    python -m patchalign shards demo --out shards/demo

    # PatchAlign3D's released training data as it is (no DINOv2 recomputed)
    python -m patchalign shards released DATA_ROOT shards/released --split train

``python -m patchalign.engine`` is the same command. Options take the spelling of the field
(``--n_points``) or with dashes (``--n-points``); a bool option alone means true (``--keep-renders``);
a list option takes its values one by one (``--templates "{part}" "a {part}"``) or as one list.
``--config FILE`` reads options from a YAML file, ``--print_config`` writes one.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import jsonargparse
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from patchalign.engine.build import (
    DEFAULT_STAGES,
    STAGES,
    MissingExtraError,
    ModelUnavailableError,
    require_demo_extra,
    run_build,
)
from patchalign.engine.cli import normalize_argv, one_line
from patchalign.engine.config import RELEASED_TEACHER_SETTINGS, EngineConfig, config_from_dict
from patchalign.engine.records import chunk_records, discover_meshes, load_records, save_records
from patchalign.engine.sources.find3d import find3d_records
from patchalign.engine.stages import StageStats
from patchalign.engine.workdir import WorkDir

log = logging.getLogger(__name__)

PROG = "python -m patchalign shards"
STAGE_HELP = {
    "sample": "sample surface points with face ids (writes the object list from --meshes/--find3d)",
    "render": "render views, keep pix_to_face",
    "features": "teacher patch features of the renders",
    "backproject": "per-point features from features + renders",
    "views": "render + features + backproject fused in memory (no large caches)",
    "labels": "per-point part membership (demo faces / Find3D masks)",
    "textbank": "encode all part names into OUT/text_bank.safetensors",
    "write": "write the shard sets OUT/<split>/",
}


def _add_engine_options(p: ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    p.add_class_arguments(EngineConfig, None, skip={"progress"})
    if defaults:
        p.set_defaults(**defaults)
    p.add_argument(
        "--released_teacher",
        type=bool,
        default=False,
        help="all released teacher settings: 518 px bicubic resize + centre crop, bicubic upsampling, "
        "per-view averaging, 20-neighbour fill, Find3D raw frame (options given on the command line win)",
    )
    p.add_argument(
        "--workers", type=int | None, default=None, help="processes for the per-object stages (default 1)"
    )
    p.add_argument("--no_progress", type=bool, default=False, help="no progress bars")
    p.add_argument("--log_level", type=str, default="INFO", help="logging level")


def _add_sources(p: ArgumentParser) -> None:
    p.add_argument(
        "--meshes", type=Path | None, default=None, help="directory of .glb/.obj/.ply meshes (recursive)"
    )
    p.add_argument(
        "--find3d", type=Path | None, default=None, help="Find3D data root (points/, rendered/, split/)"
    )
    p.add_argument("--val_fraction", type=float, default=0.0, help="uid-hashed share of meshes -> val")


def _stage_parser(description: str, needs_out: bool, sources: bool) -> ArgumentParser:
    p = ArgumentParser(description=description, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--work", type=Path, required=True, help="work directory with the per-object caches")
    if needs_out:
        p.add_argument("--out", type=Path, required=True, help="output directory of the shard sets")
    if sources:
        _add_sources(p)
    p.add_argument("--num_chunks", type=int, default=1, help="split the objects into this many chunks")
    p.add_argument("--chunk_id", type=int, default=0, help="process only this chunk (Slurm array index)")
    _add_engine_options(p)
    return p


def build_parser() -> ArgumentParser:
    """The ``shards`` command and its verbs."""
    from patchalign.engine.released import released_parser
    from patchalign.engine.sources.demo import DEMO_CONFIG, DEMO_N_OBJECTS

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog=PROG,
        description="The data engine: meshes, Find3D output or the procedural demo -> training shards. "
        f"'{PROG} VERB --help' lists a verb's options; they take dashes or underscores (--n-points).",
        exit_on_error=False,
    )
    sub = parser.add_subcommands(dest="command")
    p = ArgumentParser(description="only write the object list WORK/objects.jsonl", exit_on_error=False)
    p.add_argument("--work", type=Path, required=True, help="work directory")
    _add_sources(p)
    p.add_argument("--log_level", type=str, default="INFO", help="logging level")
    sub.add_subcommand(
        "index", p, help="only write the object list WORK/objects.jsonl (from --meshes/--find3d)"
    )
    for name, text in STAGE_HELP.items():
        p = _stage_parser(text, needs_out=name in ("textbank", "write"), sources=name == "sample")
        sub.add_subcommand(name, p, help=text)
    p = _stage_parser("run several stages (default: all, fused)", needs_out=True, sources=True)
    p.add_argument(
        "--stages",
        type=str,
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} "
        "(render,features,backproject instead of views keeps every cache)",
    )
    sub.add_subcommand("build", p, help="run several stages (default: all, fused)")
    p = ArgumentParser(
        description="build the procedural demo shard sets (train/val/heldout/unseen_names); "
        "engine defaults are the demo's (DEMO_CONFIG)",
        exit_on_error=False,
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--out", type=Path, default=Path("shards/demo"), help="output root")
    p.add_argument("--work", type=Path | None, default=None, help="default: OUT/work")
    p.add_argument("--n_objects", type=int, default=DEMO_N_OBJECTS, help="objects in total")
    p.add_argument("--demo_seed", type=int, default=0, help="generator seed offset")
    _add_engine_options(p, defaults=dict(DEMO_CONFIG))
    sub.add_subcommand(
        "demo", p, help="build the procedural demo shard sets (train/val/heldout/unseen_names)"
    )
    sub.add_subcommand(
        "released", released_parser(), help="shards from PatchAlign3D's released training data"
    )
    return parser


def _summary(results: dict[str, StageStats], wall: float, n_objects: int) -> str:
    lines = [str(s) for s in results.values()]
    lines.append(f"total {wall:.1f}s for {n_objects} objects ({n_objects / max(wall, 1e-9):.2f} obj/s)")
    return "\n".join(lines)


def _engine_config(args: Any, given: set[str]) -> EngineConfig:
    """The EngineConfig of the parsed options; ``--released-teacher`` fills what the command line left."""
    values = {k: getattr(args, k) for k in EngineConfig.__dataclass_fields__ if k != "progress"}
    if args.released_teacher:
        values.update({k: v for k, v in RELEASED_TEACHER_SETTINGS.items() if k not in given})
    values["progress"] = not args.no_progress
    return config_from_dict(values)


def _run(command: str, args: Any, given: set[str]) -> int:
    if command == "released":
        from patchalign.engine.released import run_released

        return run_released(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    t0 = time.perf_counter()
    if command == "demo":
        from patchalign.engine.sources.demo import DEMO_TEACHER, build_demo

        cfg = _engine_config(args, given)
        if cfg.teacher == DEMO_TEACHER or cfg.text_encoder == "demo":
            require_demo_extra()
        overrides = {k: getattr(cfg, k) for k in EngineConfig.__dataclass_fields__}
        work = args.work or args.out / "work"
        results = build_demo(
            str(args.out), args.n_objects, args.demo_seed, str(work), args.workers, **overrides
        )
        print(_summary(results, time.perf_counter() - t0, args.n_objects))
        return 0
    if getattr(args, "meshes", None) is not None and getattr(args, "find3d", None) is not None:
        raise ValueError("give --meshes or --find3d, not both")
    work = WorkDir(args.work)
    if getattr(args, "meshes", None) is not None:
        records = discover_meshes(args.meshes, args.val_fraction)
        save_records(work.records_path, records)
    elif getattr(args, "find3d", None) is not None:
        records = find3d_records(args.find3d)
        save_records(work.records_path, records)
    elif command == "index":
        raise ValueError("index needs --meshes or --find3d")
    else:
        records = load_records(work.records_path)
    if command == "index":
        splits = {s: sum(r.split == s for r in records) for s in sorted({r.split for r in records})}
        print(f"{len(records)} objects {splits} -> {work.records_path}")
        return 0
    cfg = _engine_config(args, given)
    chunk = chunk_records(records, args.num_chunks, args.chunk_id)
    stages = [s.strip() for s in args.stages.split(",")] if command == "build" else [command]
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


def _interrupted(command: str, args: Any) -> str:
    work = getattr(args, "work", None)
    if command == "demo":
        work = work or args.out / "work"
    if work is None or not Path(work).is_dir():
        return "interrupted; rerun the same command to resume"
    done = WorkDir(work).count_done()
    counts = ", ".join(f"{k} {v}" for k, v in done.items()) or "none yet"
    return f"interrupted; finished object files kept in {work} ({counts}): rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn the expected failures into one line each (exit 1; bad options exit 2,
    Ctrl-C exits 130). ``--log_level DEBUG`` adds the traceback to the log."""
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as e:
        verb = next((a for a in argv if not a.startswith("-")), "")
        hint = f"{PROG} {verb} --help" if verb else f"{PROG} --help"
        print(f"error: {one_line(e)} (see {hint})", file=sys.stderr)
        return 2
    command = ns.command
    args = ns[command]
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    try:
        return _run(command, args, given)
    except KeyboardInterrupt:
        print(_interrupted(command, args), file=sys.stderr)
        return 130
    except (ModelUnavailableError, MissingExtraError, FileNotFoundError, ValueError, RuntimeError) as e:
        log.debug("%s failed", command, exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
