"""Every benchmark of patchalign, in one package (tools layer: nothing below imports it).

Performance targets live here, not in timed unit tests: each module prints numbers measured on the
current hardware, next to the reference it should be read against. One entry point::

    python -m patchalign bench encoder   # forward ms/shape, GFLOP/s vs a matmul peak   (encoder.py)
    python -m patchalign bench loader    # streaming vs decoded-cache loader throughput  (loader.py)
    python -m patchalign bench train     # per stage: loader vs step samples/s           (train.py)
    python -m patchalign bench render    # Embree vs PyTorch3D ms per view               (render.py)
    python -m patchalign bench eval      # zero-shot evaluation shapes/s, load latency   (eval.py)
    python -m patchalign bench demo      # the demo's teacher / two-stage ablation       (demo.py)
    python -m patchalign bench gpu       # the prepared one-GPU check                    (gpu.py)

ZeroKey's benchmarks live with ZeroKey (``python -m zerokey bench``, ``zerokey.features.bench``):
zerokey is its own package and its benchmarks run its prediction loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(result: Any, path: str | None) -> Path | None:
    """``--json PATH``: also write a benchmark's result (``default=str`` for paths and dtypes)."""
    if not path:
        return None
    Path(path).write_text(json.dumps(result, indent=1, default=str))
    return Path(path)
