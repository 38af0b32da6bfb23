"""Loader throughput benchmark: decoded samples/s and MB/s against a raw read of the same tar bytes.

Run ``python -m patchalign bench loader [--shards DIR] [--workers 1 2] [--batch-sizes 32 256]``.
Without ``--shards`` it writes synthetic shards at Find3D's size (5000 points, 768-d fp16 features)
into a temp dir, plus a compact set of the same objects' size in the released layout (points +
128 patch centres x 768 fp16 targets, no per-point features).

What is compared, all in one process run over the same files (page cache warm):

* ``raw_read``: ``read()`` of every shard file in 1 MiB chunks, no parsing: the ceiling for any loader.
* ``tar_members``: WebDataset's tar iteration + grouping into samples, no decoding.
* ``loader[w]``: the full :class:`~patchalign.data.datamodule.ShardDataModule` training loader
  with ``w`` workers: tar, decode, checks, subsampling, collation and (for ``w > 0``) the transfer
  of batches to the main process. MB/s counts the shard bytes the samples came from.
* ``cache``: the decoded cache (``cache: host``) after its one build pass: batched torch gather,
  augmentation and bit-unpacking in the training process, timed with one torch thread (= one
  worker's share of a CPU), for the per-point set and for the compact set.

It also projects per-point feature storage for a 32k-object training set.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from patchalign.argv import cli_main
from patchalign.data.datamodule import ShardDataModule
from patchalign.data.synthetic import shard_sizes, write_synthetic_shards
from patchalign.data.writer import read_manifest
from patchalign.tools.bench import write_json

MB = 1e6


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread, as a DataLoader worker process does.

    The cached loader builds batches in the training process; timing it with one thread makes its
    samples/s comparable with one streaming worker's (and immune to other processes' load).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def storage_projection(
    n_objects: int = 32_000,
    n_points: int = 5000,
    feature_dims: Sequence[int] = (384, 768, 1024),
    n_parts: int = 8,
) -> dict[str, Any]:
    """Bytes per object and for ``n_objects`` of the per-point arrays (points fp32, membership bits)."""
    points = n_points * 3 * 4
    membership = n_points * ((n_parts + 7) // 8)
    out: dict[str, Any] = {"n_objects": n_objects, "n_points": n_points, "points_bytes": points}
    for c in feature_dims:
        for name, itemsize in (("fp16", 2), ("fp32", 4)):
            feats = n_points * c * itemsize
            per_obj = feats + points + membership
            out[f"C{c}_{name}"] = {
                "features_MB_per_object": round(feats / MB, 3),
                "object_MB": round(per_obj / MB, 3),
                "total_GB": round(per_obj * n_objects / 1e9, 1),
            }
    return out


def _raw_read(paths: list[Path]) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return time.perf_counter() - t, n


def _tar_members(urls: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    n = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    return time.perf_counter() - t, n


def _loader(
    path: Path,
    workers: int,
    batch_size: int,
    num_points: int,
    n_batches: int,
    fp16: bool,
    cache: str = "off",
) -> dict[str, float]:
    dm = ShardDataModule(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        num_points=num_points,
        shuffle_buffer=min(batch_size, 64),
        batches_per_epoch=n_batches,
        features_fp16_transfer=fp16,
        pin_memory=False,
        rotate_up=True,
        scale_range=(0.8, 1.2),
        cache=cache,  # type: ignore[arg-type]
    )
    dm.setup("fit")
    build_s = 0.0
    if cache != "off":
        t = time.perf_counter()
        dm.decoded_cache()
        build_s = time.perf_counter() - t
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for batch in loader:
        n += len(batch["uid"])
        if t_first is None:
            t_first = time.perf_counter()
            n_first = n
    t1 = time.perf_counter()
    steady = (n - n_first) / (t1 - t_first) if n > n_first and t1 > t_first else float("nan")
    return {
        "seconds": t1 - t0,
        "samples": n,
        "samples_s": n / (t1 - t0),
        "steady_samples_s": steady,
        "cache_build_s": build_s,
    }


def run_loader_bench(
    shard_dir: str | Path | None = None,
    workers: Sequence[int] = (1, 2),
    batch_sizes: Sequence[int] = (32, 256),
    num_points: int = 2048,
    n_objects: int = 96,
    stored_points: int = 5000,
    feature_dim: int = 768,
    fp16_transfer: Sequence[bool] = (True,),
    n_batches: int = 6,
    compact_objects: int = 512,
) -> dict[str, Any]:
    """Measure raw read vs. full loader throughput; builds synthetic shards if ``shard_dir`` is None.

    Returns a JSON-serialisable dict (see module docstring); ``loader`` entries are keyed
    ``"b{batch}_w{workers}_{fp32|fp16}"`` and carry ``samples_s``, ``MB_s``,
    ``per_worker_samples_s`` and ``vs_raw`` (loader MB/s over raw-read MB/s); ``cache`` entries are
    keyed ``"{per_point|compact}_b{batch}"``.
    """
    tmp = None
    compact_dir = None
    if shard_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="patchalign-bench-")
        shard_dir = Path(tmp.name) / "per_point"
        per_shard = 16
        sizes = shard_sizes(n_objects, per_shard)
        write_synthetic_shards(shard_dir, sizes, num_points=stored_points, feature_dim=feature_dim)
        if compact_objects:
            compact_dir = Path(tmp.name) / "compact"
            sizes = shard_sizes(compact_objects, 128)
            write_synthetic_shards(
                compact_dir, sizes, num_points=stored_points, feature_dim=feature_dim, targets="patches"
            )
    try:
        m = read_manifest(shard_dir)
        paths = m.shard_paths()
        total_bytes = sum(s.bytes for s in m.shards)
        n_samples = m.n_samples
        bytes_per_sample = total_bytes / n_samples
        _raw_read(paths)  # warm the page cache so every measurement below reads from memory
        raw_s, raw_n = _raw_read(paths)
        tar_s, tar_n = _tar_members(m.shard_urls())
        result: dict[str, Any] = {
            "shard_dir": str(shard_dir),
            "n_samples": n_samples,
            "n_shards": len(paths),
            "feature_dim": m.feature_dim,
            "shard_bytes": total_bytes,
            "bytes_per_sample": round(bytes_per_sample),
            "raw_read": {"MB_s": raw_n / raw_s / MB, "samples_s": n_samples / raw_s},
            "tar_members": {"MB_s": total_bytes / tar_s / MB, "samples_s": tar_n / tar_s},
            "loader": {},
            "cache": {},
            "storage_projection": storage_projection(),
        }
        raw_mb_s = result["raw_read"]["MB_s"]
        for bs in batch_sizes:
            for fp16 in fp16_transfer:
                for w in workers:
                    if w > n_batches:
                        continue
                    r = _loader(Path(shard_dir), w, bs, num_points, n_batches, fp16)
                    r["MB_s"] = r["samples_s"] * bytes_per_sample / MB
                    r["steady_MB_s"] = r["steady_samples_s"] * bytes_per_sample / MB
                    r["per_worker_samples_s"] = r["samples_s"] / max(1, w)
                    r["vs_raw"] = r["MB_s"] / raw_mb_s
                    r["steady_vs_raw"] = r["steady_MB_s"] / raw_mb_s
                    result["loader"][f"b{bs}_w{w}_{'fp16' if fp16 else 'fp32'}"] = r
            sets = [("per_point", Path(shard_dir))] + ([("compact", compact_dir)] if compact_dir else [])
            for name, path in sets:
                with one_thread():
                    r = _loader(path, 0, bs, num_points, n_batches, True, cache="host")
                r["per_worker_samples_s"] = r["samples_s"]
                result["cache"][f"{name}_b{bs}"] = r
        if compact_dir is not None:
            cm = read_manifest(compact_dir)
            result["compact_bytes_per_sample"] = round(sum(s.bytes for s in cm.shards) / cm.n_samples)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _print(result: dict[str, Any]) -> None:
    print(
        f"{result['n_samples']} samples in {result['n_shards']} shards, C={result['feature_dim']}, "
        f"{result['bytes_per_sample'] / MB:.2f} MB/sample"
    )
    raw, tar = result["raw_read"], result["tar_members"]
    print(f"{'raw read':>22}: {raw['samples_s']:8.1f} samples/s {raw['MB_s']:8.0f} MB/s")
    print(f"{'tar members (no decode)':>22}: {tar['samples_s']:8.1f} samples/s {tar['MB_s']:8.0f} MB/s")
    for name, r in result["loader"].items():
        print(
            f"{'stream ' + name:>22}: {r['samples_s']:8.1f} samples/s {r['MB_s']:8.0f} MB/s "
            f"({r['vs_raw']:.2f}x raw; steady {r['steady_MB_s']:.0f} MB/s = {r['steady_vs_raw']:.2f}x; "
            f"{r['per_worker_samples_s']:.1f} samples/s per worker)"
        )
    if "compact_bytes_per_sample" in result:
        print(
            f"compact (released patch targets) set: {result['compact_bytes_per_sample'] / MB:.3f} MB/sample"
        )
    for name, r in result.get("cache", {}).items():
        print(
            f"{'cache ' + name:>22}: {r['samples_s']:8.1f} samples/s per worker (1 thread, in the training "
            f"process; built in {r['cache_build_s']:.1f} s)"
        )
    best = {}
    for name, r in result["loader"].items():
        bs = name.split("_")[0]
        best[bs] = max(best.get(bs, 0.0), r["per_worker_samples_s"])
    for name, r in result.get("cache", {}).items():
        bs = name.rsplit("_", 1)[1]
        if bs in best and best[bs] > 0:
            print(f"{name}: {r['samples_s'] / best[bs]:.1f}x the best streaming samples/s per worker at {bs}")
    proj = result["storage_projection"]
    print(f"per-point storage for {proj['n_objects']} objects x {proj['n_points']} points:")
    for k, v in proj.items():
        if isinstance(v, dict):
            print(f"  {k:>10}: {v['object_MB']:.2f} MB/object, {v['total_GB']:.1f} GB total")


def loader_bench(
    shards: str | None = None,
    workers: list[int] = [1, 2],  # noqa: B006 - jsonargparse reads the default from the signature
    batch_sizes: list[int] = [32, 256],  # noqa: B006
    batches: int = 6,
    num_points: int = 2048,
    objects: int = 96,
    compact_objects: int = 512,
    feature_dim: int = 768,
    json: str | None = None,
) -> int:
    """Loader throughput: decoded samples/s and MB/s against a raw read of the same tar bytes.

    Args:
        shards: shard dir (default: synthetic Find3D-sized shards in a temp dir).
        workers: loader worker counts to time.
        batch_sizes: batch sizes to time.
        batches: batches per measured pass.
        num_points: points per sample.
        objects: synthetic per-point objects to write.
        compact_objects: synthetic compact objects (0: none).
        feature_dim: teacher feature width of the synthetic shards.
        json: also write the result dict here.
    """
    logging.basicConfig(level=logging.WARNING)
    result = run_loader_bench(
        shards,
        workers=workers,
        batch_sizes=batch_sizes,
        num_points=num_points,
        n_objects=objects,
        feature_dim=feature_dim,
        n_batches=batches,
        compact_objects=compact_objects,
    )
    _print(result)
    write_json(result, json)
    return 0


main = cli_main(loader_bench, "python -m patchalign bench loader")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
