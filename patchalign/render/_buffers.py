"""Large CPU output buffers allocated through numpy.

The renderers return 50-200 MB of dense per-pixel tensors per call (26 views at 448 px). Most of the
cost of a fresh buffer is first-touch page faults, and numpy asks the kernel to back large arrays with
transparent huge pages (``madvise``), so its buffers fault in 2 MB pages rather than 4 KB ones: filling
the four mesh outputs measured ~5x faster than ``torch.full`` (0.5 vs 2.7 ms per 448 px view, single
thread). The tensors share the numpy memory (``torch.from_numpy``) and are ordinary CPU tensors
otherwise (they cannot be resized in place).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = {
    torch.bool: np.bool_,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def cpu_full(shape: tuple[int, ...], value: float, dtype: torch.dtype) -> Tensor:
    """``torch.full(shape, value, dtype=dtype)`` on the CPU, with numpy's huge-page allocation."""
    if value == 0:
        return torch.from_numpy(np.zeros(shape, dtype=_NUMPY_DTYPES[dtype]))  # calloc: zeroed lazily
    return torch.from_numpy(np.full(shape, value, dtype=_NUMPY_DTYPES[dtype]))


def cpu_nonnegative(tensor: Tensor) -> Tensor:
    """``tensor >= 0`` as a bool tensor, allocated by numpy when ``tensor`` is on the CPU."""
    if tensor.device.type != "cpu":
        return tensor >= 0
    return torch.from_numpy(tensor.numpy() >= 0)
