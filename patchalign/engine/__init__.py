"""The data engine that builds training shards: ``python -m patchalign shards VERB`` (``--help`` lists them).

Modules, in dependency order: :mod:`~patchalign.engine.teachers` and
:mod:`~patchalign.engine.backproject` (2D teacher features onto points), :mod:`~patchalign.engine.config`
(:class:`EngineConfig`), :mod:`~patchalign.engine.records` (the objects), :mod:`~patchalign.engine.sources`
(where an object comes from: mesh files, the procedural demo, Find3D output, plug-ins),
:mod:`~patchalign.engine.workdir` (per-object caches), :mod:`~patchalign.engine.stages` (what each stage
does), :mod:`~patchalign.engine.build` (running them, in a pool if asked) and
:mod:`~patchalign.engine.released` (PatchAlign3D's released training data as shards).
"""

from patchalign.engine.backproject import (
    BackprojectionResult,
    NoVisiblePointsError,
    backproject_features,
    face_feature_sums,
    fill_unseen,
)
from patchalign.engine.build import STAGES, ModelUnavailableError, run_build
from patchalign.engine.config import EngineConfig
from patchalign.engine.records import ObjectRecord, chunk_records, discover_meshes, load_records, save_records
from patchalign.engine.sources.find3d import find3d_records
from patchalign.engine.stages import StageStats
from patchalign.engine.workdir import WorkDir

__all__ = [
    "STAGES",
    "BackprojectionResult",
    "EngineConfig",
    "ModelUnavailableError",
    "NoVisiblePointsError",
    "ObjectRecord",
    "StageStats",
    "WorkDir",
    "backproject_features",
    "chunk_records",
    "discover_meshes",
    "face_feature_sums",
    "fill_unseen",
    "find3d_records",
    "load_records",
    "run_build",
    "save_records",
]
