"""Who limits training: the loader or the model step, per stage, streaming vs decoded cache.

``python -m patchalign bench train [--batch-sizes 32 256] [--workers 2] [--precision bf16]``

For each stage and batch size it prints the loader's samples/s (total and per loader worker) for
the streaming WebDataset path (``cache: off``) and the decoded cache (``cache: host``, or
``device`` on a GPU), the model step's samples/s (forward + backward + AdamW of the stage's
LightningModule on one resident batch of that path) and their ratio; ``loader/step >= 1`` means
the step is the bottleneck. On a CPU the cached loader is timed with one torch thread, so its
samples/s is one worker's (it runs in the training process, no workers). Training is
step-bound when the ratio is >= 1.5 (issue 13's target).

Data (synthetic, real dtypes and shapes, Find3D's 5000 points per object, 768-d teacher):

* Stage 1 streaming: today's per-point shards (5000 x 768 fp16 features per object, 7.75 MB),
  shipped as fp16 like ``configs/stage1.yaml``.
* Stage 1 cached: the released compact layout (points + 128 centres x 768 fp16 patch targets).
* Stage 2 (both paths): points + packed part masks only (no teacher features).

On a CPU, the model step is timed at batch ``min(batch, --model-max-batch)`` (default 32 there:
a 256-shape full-size step takes minutes on 2 cores); samples/s of a compute-bound step barely
depends on the batch there, and the table says which batch was timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from patchalign.argv import cli_main
from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.tools.bench import write_json
from patchalign.tools.bench.loader import one_thread


def _time_loader(dm: Any, n_batches: int) -> tuple[float, dict[str, Any]]:
    """Samples/s of the training loader after one warm-up batch (worker start-up excluded)."""
    it = iter(dm.train_dataloader())
    first = next(it)
    bs = first["points"].shape[0]
    start = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        try:
            next(it)
        except StopIteration:
            break
        n += bs
    return n / max(time.perf_counter() - start, 1e-9), first


def _time_model(
    module: Any, batch: dict[str, Any], steps: int, device: torch.device, precision: str
) -> tuple[float, list[float]]:
    """Samples/s of forward + backward + optimiser step on one resident batch; also the losses."""
    module = module.to(device).train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    for key in ("features", "patch_features"):
        if isinstance(batch.get(key), torch.Tensor):
            batch[key] = batch[key].float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    losses: list[float] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch["points"].shape[0] / (time.perf_counter() - start), losses


def _quiet(module: Any) -> Any:
    """No Trainer is attached: make ``training_step``'s logging calls no-ops."""
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    module._log_skips = lambda: None  # type: ignore[method-assign]
    return module


def _slice(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in batch.items()}


def write_bench_shards(
    root: Path, n_stream: int, n_cache: int, feature_dim: int, text_dim: int, stored_points: int = 5000
) -> dict[str, Path]:
    """The three synthetic shard sets the bench reads (see module docstring) plus a text bank."""
    from patchalign.data.synthetic import shard_sizes, write_synthetic_shards, write_synthetic_text_bank

    sets = {
        "stage1_stream": ("points", n_stream, 16),
        "stage1_cache": ("patches", n_cache, 128),
        "stage2": ("none", n_cache, 128),
    }
    out = {}
    for name, (targets, n, per) in sets.items():
        path = root / name
        write_synthetic_shards(
            path,
            shard_sizes(n, per),
            num_points=stored_points,
            feature_dim=feature_dim,
            with_text_bank=False,
            targets=targets,  # type: ignore[arg-type]
            uid_prefix=name,
        )
        write_synthetic_text_bank(path / "text_bank.safetensors", dim=text_dim)
        out[name] = path
    return out


def run_train_bench(
    batch_sizes: tuple[int, ...] = (32, 256),
    workers: int = 2,
    steps: int = 2,
    device: str | None = None,
    precision: str | None = None,
    loader_batches: int = 8,
    n_stream: int = 96,
    n_cache: int = 512,
    feature_dim: int = 768,
    text_dim: int = 1280,
    model_max_batch: int | None = None,
    shard_root: str | None = None,
    encoder: EncoderConfig | None = None,
) -> dict[str, Any]:
    """Measure every (stage, path, batch) row; see the module docstring. Returns a JSON-able dict."""
    from patchalign.data.datamodule import ShardDataModule
    from patchalign.training.modules import Stage1Distillation, Stage2Alignment

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if dev.type == "cuda" else "32")
    if model_max_batch is None:
        model_max_batch = 32 if dev.type == "cpu" else max(batch_sizes)
    tmp = None
    if shard_root is None:
        tmp = tempfile.TemporaryDirectory(prefix="patchalign-trainbench-")
        shard_root = tmp.name
    paths = write_bench_shards(Path(shard_root), n_stream, n_cache, feature_dim, text_dim)
    enc_cfg = encoder or EncoderConfig()
    rows: list[dict[str, Any]] = []
    model_cache: dict[tuple[str, str, int], tuple[float, list[float]]] = {}
    try:
        for stage in ("stage1", "stage2"):
            for path_kind in ("stream", "cache"):
                name = f"stage1_{path_kind}" if stage == "stage1" else "stage2"
                shards = paths[name]
                for bs in batch_sizes:
                    dm = ShardDataModule(
                        str(shards),
                        batch_size=bs,
                        num_workers=workers,
                        num_points=2048,
                        shuffle_buffer=min(bs, 64),
                        batches_per_epoch=loader_batches + 1,
                        pin_memory=dev.type == "cuda",
                        features_fp16_transfer=True,
                        load_features=stage == "stage1",
                        rotate_up=True,
                        scale_range=(0.8, 1.2),
                        cache="off"
                        if path_kind == "stream"
                        else ("device" if dev.type == "cuda" else "host"),
                    )
                    dm.setup("fit")
                    build_s = 0.0
                    if path_kind == "cache":
                        t = time.perf_counter()
                        cache = dm.decoded_cache()
                        build_s = time.perf_counter() - t
                    threads = (
                        one_thread()
                        if path_kind == "cache" and dev.type == "cpu"
                        else contextlib.nullcontext()
                    )
                    with threads:
                        loader_sps, batch = _time_loader(dm, loader_batches)
                    per_worker = loader_sps / max(1, workers) if path_kind == "stream" else loader_sps
                    mb = min(bs, model_max_batch)
                    key = (stage, path_kind, mb)
                    if key not in model_cache:
                        if stage == "stage1":
                            module = Stage1Distillation(
                                PatchAlignEncoder(dataclasses.replace(enc_cfg, head_dim=dm.feature_dim))
                            )
                        else:
                            module = Stage2Alignment(
                                PatchAlignEncoder(dataclasses.replace(enc_cfg, head_dim=text_dim)),
                                text_bank=str(shards / "text_bank.safetensors"),
                            )
                        model_cache[key] = _time_model(
                            _quiet(module), _slice(batch, mb), steps, dev, precision
                        )
                    model_sps, losses = model_cache[key]
                    row = {
                        "stage": stage,
                        "path": path_kind,
                        "batch": bs,
                        "workers": workers if path_kind == "stream" else 0,
                        "loader_samples_s": loader_sps,
                        "loader_samples_s_per_worker": per_worker,
                        "model_batch": mb,
                        "model_samples_s": model_sps,
                        "loader_over_step": loader_sps / model_sps,
                        "limited_by": "loader" if loader_sps < model_sps else "step",
                        "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
                    }
                    if path_kind == "cache":
                        row["cache_build_s"] = build_s
                        row["cache_MB_per_object"] = cache.nbytes / len(cache) / 1e6
                    rows.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "rows": rows,
    }


def print_train_bench(r: dict[str, Any]) -> None:
    print(f"training throughput on {r['device']} ({r['threads']} threads, precision {r['precision']})")
    head = (
        f"{'stage':<7}{'path':<8}{'batch':>6}{'workers':>8}{'loader/s':>10}{'per wkr':>9}"
        f"{'step batch':>11}{'step/s':>9}{'loader/step':>12}  limited by"
    )
    print(head)
    for x in r["rows"]:
        extra = ""
        if x["path"] == "cache":
            extra = f"  (cache {x['cache_MB_per_object']:.2f} MB/object, built in {x['cache_build_s']:.1f} s)"
        print(
            f"{x['stage']:<7}{x['path']:<8}{x['batch']:>6}{x['workers']:>8}{x['loader_samples_s']:>10.1f}"
            f"{x['loader_samples_s_per_worker']:>9.1f}{x['model_batch']:>11}{x['model_samples_s']:>9.2f}"
            f"{x['loader_over_step']:>12.2f}  {x['limited_by']}{extra}"
        )
    s1 = {(x["path"], x["batch"]): x for x in r["rows"] if x["stage"] == "stage1"}
    for bs in sorted({b for _, b in s1}):
        if ("stream", bs) in s1 and ("cache", bs) in s1:
            c, st = s1[("cache", bs)], s1[("stream", bs)]
            gain = c["loader_samples_s_per_worker"] / st["loader_samples_s_per_worker"]
            print(
                f"stage1 batch {bs}: cached path decodes {gain:.1f}x the samples/s per worker of the stream"
            )


def train_bench(
    batch_sizes: list[int] = [32, 256],  # noqa: B006 - jsonargparse reads the default from the signature
    workers: int = 2,
    steps: int = 2,
    loader_batches: int = 8,
    stream_objects: int = 96,
    cache_objects: int = 512,
    model_max_batch: int | None = None,
    device: str | None = None,
    precision: Literal["32", "bf16"] | None = None,
    shard_root: str | None = None,
    json: str | None = None,
) -> int:
    """Who limits training, per stage: the loader or the model step (streaming vs decoded cache).

    Args:
        batch_sizes: batch sizes to time.
        workers: streaming loader workers.
        steps: timed model steps (after one warm-up step).
        loader_batches: timed loader batches (after one).
        stream_objects: per-point Stage 1 objects (7.75 MB each).
        cache_objects: compact objects.
        model_max_batch: largest batch the model step is timed at (default: 32 on CPU, all on GPU).
        device: torch device (default: cuda if available, else cpu).
        precision: model step precision (default: bf16 on GPU, 32 on CPU).
        shard_root: write the synthetic shards here (default: a temp dir).
        json: also write the result dict here.
    """
    r = run_train_bench(
        tuple(batch_sizes),
        workers,
        steps,
        device,
        precision,
        loader_batches,
        stream_objects,
        cache_objects,
        model_max_batch=model_max_batch,
        shard_root=shard_root,
    )
    print_train_bench(r)
    write_json(r, json)
    return 0


main = cli_main(train_bench, "python -m patchalign bench train")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
