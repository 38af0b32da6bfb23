"""Zero-shot part-segmentation evaluation: benchmark readers, the protocol, metrics and reports.

Submodules: :mod:`~patchalign.eval.readers` (one reader per benchmark, registry),
:mod:`~patchalign.eval.protocol` (normalisation, seeded sampling, batching),
:mod:`~patchalign.eval.references` (the talk's numbers), :mod:`~patchalign.eval.report`
(``python -m patchalign report``), :mod:`~patchalign.eval.metrics` (torchmetrics mIoU),
:mod:`~patchalign.eval.evaluator` (the zero-shot protocol ``zero_shot_predict``, ``PartSegEvaluator``,
``run_zero_shot_eval``), :mod:`~patchalign.eval.datamodule`, :mod:`~patchalign.eval.module` and
:mod:`~patchalign.eval.callbacks` (``python -m patchalign test``).

Names are resolved lazily so that importing one light submodule does not import every reader,
torchmetrics and Lightning. Neither the core nor training imports this package
(``tests/test_architecture.py``); point-file readers shared with other layers live in
:mod:`patchalign.io`.
"""

from __future__ import annotations

from patchalign.lazy import lazy_getattr

_EXPORTS = {
    "PartSegDataset": "readers",
    "PartSegSample": "readers",
    "ResampledDataset": "protocol",
    "ShapeNetPartTxt": "readers",
    "ShapeNetPartH5": "readers",
    "PartNetE": "readers",
    "FaustSATR": "readers",
    "ScanObjectNNParts": "readers",
    "ScanObjectNNH5": "readers",
    "ObjaverseFind3D": "readers",
    "build_dataset": "readers",
    "collate_part_samples": "protocol",
    "CONVENTIONS": "metrics",
    "PartSegIoU": "metrics",
    "per_shape_miou": "metrics",
    "zero_shot_predict": "evaluator",
    "PartSegEvaluator": "evaluator",
    "EvalReport": "evaluator",
    "run_zero_shot_eval": "evaluator",
    "EvalDataModule": "datamodule",
    "TALK_REFERENCES": "references",
    "BestWorstPictures": "callbacks",
    "ZeroShotSegmentation": "module",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, {k: f"patchalign.eval.{v}" for k, v in _EXPORTS.items()})
