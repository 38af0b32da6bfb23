"""ZeroKey: zero-shot 3D keypoints from multimodal LLM pointing, as a Lightning prediction loop.

render 26 views -> name keypoints (LLM / config / KeypointNet) -> point at them in 2D (Molmo, an
OpenAI-compatible server, or the OraclePointer evaluation tool) -> lift Gaussian pixel patches to the
surface -> weighted HDBSCAN per name -> densest cluster's centroid snapped to the surface.

Entry point: ``python -m zerokey {predict,evaluate,bench}``. Submodules are imported lazily so that
``import zerokey`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ZeroKeyPipeline": "zerokey.pipeline",
    "ShapePrediction": "zerokey.pipeline",
    "ZeroKeyModule": "zerokey.module",
    "ZeroKeyDataModule": "zerokey.module",
    "KeypointJSONWriter": "zerokey.writer",
    "Namer": "zerokey.namers",
    "StaticNamer": "zerokey.namers",
    "KeypointNetNamer": "zerokey.namers",
    "OpenAINamer": "zerokey.namers",
    "Pointer": "zerokey.pointers",
    "OraclePointer": "zerokey.pointers",
    "OpenAIPointer": "zerokey.pointers",
    "MolmoPointer": "zerokey.pointers",
    "ShapeSample": "zerokey.data",
    "FileShapeDataset": "zerokey.data",
    "KeypointNetDataset": "zerokey.data",
    "ClusterConfig": "zerokey.cluster",
    "ViewConfig": "zerokey.views",
    "evaluate_predictions": "zerokey.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zerokey' has no attribute {name!r}")
