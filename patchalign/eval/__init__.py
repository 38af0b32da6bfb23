"""Zero-shot part-segmentation evaluation: benchmark readers, the protocol, metrics and reports.

Submodules: :mod:`~patchalign.eval.datasets` (readers), :mod:`~patchalign.eval.zeroshot`
(protocol), :mod:`~patchalign.eval.metrics` (torchmetrics mIoU), :mod:`~patchalign.eval.evaluator`
(``PartSegEvaluator``, ``run_zero_shot_eval``), :mod:`~patchalign.eval.datamodule` (Lightning),
:mod:`~patchalign.eval.bench`.

Names are resolved lazily so that importing one light submodule (the inference API uses
``zeroshot``) does not pull in torchmetrics or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PartSegDataset": "datasets",
    "PartSegSample": "datasets",
    "ResampledDataset": "datasets",
    "ShapeNetPartTxt": "datasets",
    "ShapeNetPartH5": "datasets",
    "PartNetE": "datasets",
    "FaustSATR": "datasets",
    "ScanObjectNNParts": "datasets",
    "ScanObjectNNH5": "datasets",
    "ObjaverseFind3D": "datasets",
    "build_dataset": "datasets",
    "collate_part_samples": "datasets",
    "CONVENTIONS": "metrics",
    "PartSegIoU": "metrics",
    "per_shape_miou": "metrics",
    "PartTextEmbedder": "zeroshot",
    "assign_point_labels": "zeroshot",
    "zero_shot_predict": "zeroshot",
    "PartSegEvaluator": "evaluator",
    "EvalReport": "evaluator",
    "run_zero_shot_eval": "evaluator",
    "EvalDataModule": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"patchalign.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'patchalign.eval' has no attribute {name!r}")
