"""``python -m patchalign bench encoder``: forward time of the full-size encoder and its GFLOP/s next
to a matmul peak measured in the same run on the same device."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from json import dumps
from typing import Literal

import torch

from patchalign.argv import cli_main


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, min_time: float = 1.0, warmup: int = 2) -> float:
    """Median-free simple timer: seconds per call, repeating until ``min_time`` has elapsed."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and n >= 2:
            return elapsed / n


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048) -> float:
    """Achieved GFLOP/s of a square matmul on this device: the practical compute ceiling."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sec = _time(lambda: a @ b, device, min_time=1.0)
    return 2 * size**3 / sec / 1e9


def bench_encoder(
    batch_sizes: tuple[int, ...] = (1, 16, 64),
    device: str | None = None,
    num_points: int = 2048,
    dtype: str = "float32",
    min_time: float = 2.0,
) -> dict:
    """Forward time per shape of the full-size encoder (1280 head) at several batch sizes.

    Reports achieved GFLOP/s against the measured matmul peak and the ratio of the measured time to
    the matmul-bound time (``flops / peak``); 1.0 would be a perfect matmul-bound forward.
    """
    from patchalign.model import EncoderConfig, PatchAlignEncoder

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    model = PatchAlignEncoder(EncoderConfig(head_dim=1280)).to(dev).eval()
    flops = model.flops_per_shape(num_points)
    peak = matmul_peak_gflops(dev, dtype=dt if dev.type == "cuda" else torch.float32)
    rows = []
    for bs in batch_sizes:
        pts = torch.randn(bs, num_points, 3, device=dev)

        def step(pts: torch.Tensor = pts) -> object:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
                return model(pts)

        sec = _time(step, dev, min_time=min_time)
        per_shape = sec / bs
        achieved = flops / per_shape / 1e9
        rows.append(
            {
                "batch": bs,
                "ms_per_shape": per_shape * 1e3,
                "shapes_per_s": 1 / per_shape,
                "gflops": achieved,
                "matmul_bound_ms": flops / (peak * 1e9) * 1e3,
                "ratio_to_matmul_bound": per_shape / (flops / (peak * 1e9)),
            }
        )
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "gflop_per_shape": flops / 1e9,
        "matmul_peak_gflops": peak,
        "rows": rows,
    }


def _print_encoder(res: dict) -> None:
    print(
        f"encoder forward on {res['device']} ({res['threads']} threads, {res['dtype']}): "
        f"{res['gflop_per_shape']:.2f} GFLOP/shape, matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s"
    )
    print(f"{'batch':>6} {'ms/shape':>10} {'shapes/s':>10} {'GFLOP/s':>9} {'bound ms':>9} {'x bound':>8}")
    for r in res["rows"]:
        print(
            f"{r['batch']:>6} {r['ms_per_shape']:>10.2f} {r['shapes_per_s']:>10.1f} {r['gflops']:>9.1f} "
            f"{r['matmul_bound_ms']:>9.2f} {r['ratio_to_matmul_bound']:>8.2f}"
        )


def encoder_bench(
    batch_sizes: list[int] = [1, 16, 64],  # noqa: B006 - jsonargparse reads the default from the signature
    device: str | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    json: bool = False,
) -> int:
    """Forward time of the full-size encoder and its GFLOP/s next to a matmul peak on the same device.

    Args:
        batch_sizes: batch sizes to time.
        device: torch device (default: cuda if available, else cpu).
        dtype: autocast dtype of the forward.
        json: print JSON instead of a table.
    """
    res = bench_encoder(tuple(batch_sizes), device, dtype=dtype)
    print(dumps(res, indent=2)) if json else _print_encoder(res)
    return 0


main = cli_main(encoder_bench, "python -m patchalign bench encoder")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
