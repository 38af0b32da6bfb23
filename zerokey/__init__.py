"""ZeroKey (Gong et al., arXiv:2412.06292): zero-shot 3D keypoints from multimodal LLM pointing, as a
Lightning prediction loop.

render 26 views -> name keypoints (GPT-4o "List possible salient key points (in text).", or config /
KeypointNet names) -> point at each name in each view ("Point to the {name} in this image.": Molmo in
process, an OpenAI-compatible server such as vLLM, or the OraclePointer evaluation tool) -> lift
Gaussian pixel patches to the surface -> HDBSCAN per name (minPts 10) -> the densest cluster's centroid
snapped to the surface. Where our defaults differ from the paper, ``docs/fidelity.md`` says so.

Entry point: ``python -m zerokey {predict,evaluate,bench}``. Submodules are imported lazily so that
``import zerokey`` stays cheap.
"""

from __future__ import annotations

from patchalign.lazy import lazy_getattr

_EXPORTS = {
    "ZeroKeyPipeline": "zerokey.pipeline",
    "ShapePrediction": "zerokey.pipeline",
    "ZeroKeyModule": "zerokey.module",
    "ZeroKeyDataModule": "zerokey.module",
    "KeypointJSONWriter": "zerokey.writer",
    "Namer": "zerokey.mllm.namers",
    "StaticNamer": "zerokey.mllm.namers",
    "KeypointNetNamer": "zerokey.mllm.namers",
    "OpenAINamer": "zerokey.mllm.namers",
    "Pointer": "zerokey.mllm.pointers",
    "OraclePointer": "zerokey.mllm.pointers",
    "OpenAIPointer": "zerokey.mllm.pointers",
    "MolmoPointer": "zerokey.mllm.pointers",
    "ShapeSample": "zerokey.data",
    "FileShapeDataset": "zerokey.data",
    "KeypointNetDataset": "zerokey.data",
    "ClusterConfig": "zerokey.cluster",
    "CallBudget": "zerokey.mllm.client",
    "ChatClient": "zerokey.mllm.client",
    "ZeroKeyRunError": "zerokey.writer",
    "view_layout": "zerokey.views",
    "ViewConfig": "zerokey.views",
    "evaluate_predictions": "zerokey.evaluate",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
