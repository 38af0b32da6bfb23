"""Training throughput per stage, with data loading and the model step timed separately.

``python -m patchalign.bench train [--shards DIR] [--batch-size 16] [--steps 5] [--workers 2]``

Data: batches/s of the real :class:`~patchalign.data.datamodule.ShardDataModule` pipeline (decode,
subsample, augment, collate) with no model attached. Model: forward + backward + AdamW step of each
stage's LightningModule on one resident batch, so the two numbers say which one limits training.
Without ``--shards`` a synthetic shard set with the real dtypes and shapes is written to a temp dir.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from patchalign.model import EncoderConfig, PatchAlignEncoder


def _time_loader(dm: Any, n_batches: int) -> float:
    """Samples/s of the training loader, after one warm-up batch (worker start-up excluded)."""
    loader = dm.train_dataloader()
    it = iter(loader)
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
    return n / max(time.perf_counter() - start, 1e-9)


def _time_model(
    module: Any, batch: dict[str, Any], steps: int, device: torch.device, precision: str
) -> float:
    """Samples/s of forward + backward + optimiser step on one resident batch."""
    module = module.to(device).train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "features" in batch:
        batch["features"] = batch["features"].float()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch["points"].shape[0] / (time.perf_counter() - start)


class _NoLog:
    """Stands in for the Trainer so ``training_step``'s ``self.log`` calls are no-ops."""


def run_train_bench(
    shards: str | None,
    batch_size: int,
    steps: int,
    workers: int,
    device: str | None,
    precision: str,
    feature_dim: int = 768,
    text_dim: int = 1280,
) -> dict:
    from patchalign.data.datamodule import ShardDataModule
    from patchalign.data.synthetic import write_synthetic_shards, write_synthetic_text_bank
    from patchalign.lit import Stage1Distillation, Stage2Alignment

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = None
    if shards is None:
        tmp = tempfile.TemporaryDirectory()
        out = Path(tmp.name) / "s"
        write_synthetic_shards(out, [64, 64], feature_dim=feature_dim, with_text_bank=False)
        shards = str(out)
        write_synthetic_text_bank(Path(shards) / "text_bank.safetensors", dim=text_dim)
    dm = ShardDataModule(
        shards,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        text_bank=str(Path(shards) / "text_bank.safetensors")
        if (Path(shards) / "text_bank.safetensors").exists()
        else None,
    )
    dm.setup("fit")
    data_sps = _time_loader(dm, max(steps, 4))
    batch = next(iter(dm.train_dataloader()))
    results = {
        "device": str(dev),
        "batch_size": batch_size,
        "workers": workers,
        "precision": precision,
        "data_samples_per_s": data_sps,
        "stages": {},
    }
    c = dm.feature_dim
    s1 = Stage1Distillation(PatchAlignEncoder(EncoderConfig(head_dim=c)))
    s2 = Stage2Alignment(PatchAlignEncoder(EncoderConfig(head_dim=dm.text_bank.dim)), text_bank=dm.text_bank)
    for name, module in (("stage1", s1), ("stage2", s2)):
        module.log = lambda *a, **k: None  # type: ignore[method-assign]
        module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
        module._log_skips = lambda: None  # type: ignore[method-assign]
        sps = _time_model(module, dict(batch), steps, dev, precision)
        results["stages"][name] = {
            "model_samples_per_s": sps,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "limited_by": "data" if data_sps < sps else "model",
        }
    if tmp is not None:
        tmp.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m patchalign.bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", default=None, help="shard directory (default: synthetic, C=768, D=1280)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    args = p.parse_args(argv)
    r = run_train_bench(args.shards, args.batch_size, args.steps, args.workers, args.device, args.precision)
    print(
        f"training throughput on {r['device']} (batch {r['batch_size']}, {r['workers']} loader workers, "
        f"precision {r['precision']})"
    )
    print(f"  data loader alone: {r['data_samples_per_s']:.1f} samples/s")
    for name, s in r["stages"].items():
        print(
            f"  {name}: model step {s['model_samples_per_s']:.2f} samples/s "
            f"({s['trainable_params'] / 1e6:.2f} M trainable) → limited by {s['limited_by']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
