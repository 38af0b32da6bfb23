"""``python -m patchalign bench WHAT [options]``: dispatch to one benchmark module's own CLI."""

from __future__ import annotations

import importlib
import sys

#: verb -> (module under patchalign.tools.bench, one line for --help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "encoder": ("encoder", "encoder forward time and GFLOP/s vs matmul peak"),
    "loader": ("loader", "shard loader throughput: streaming vs decoded cache"),
    "train": ("train", "training samples/s per stage, data and model timed separately"),
    "render": ("render", "Embree vs PyTorch3D rendering time per view"),
    "eval": ("eval", "zero-shot evaluation throughput and load_pretrained latency"),
    "demo": ("demo", "the demo ablation: random vs DINOv2 teacher vs no Stage 1, same budget"),
    "gpu": ("gpu", "the prepared one-GPU check (imports, render parity, encoder, fits, loader, ZeroKey)"),
    "segment": ("segment", "full-resolution segmentation: 1M-point cloud, 100k-face mesh (time, memory)"),
    "votes": ("votes", "test-time voting on the real labelled shapes: mIoU for 1/2/4/8 votes, rotations"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        lines = [f"  {k:<8} {help_}" for k, (_, help_) in BENCHMARKS.items()]
        print("usage: python -m patchalign bench WHAT [options]  (WHAT --help for its options)\n")
        print("\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"patchalign.tools.bench.{BENCHMARKS[argv[0]][0]}")
    rc = module.main(argv[1:])  # a module's main may return its results instead of a code
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
