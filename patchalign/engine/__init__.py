"""The data engine that builds training shards: ``python -m patchalign.engine {sample,...,build,demo}``.

See :mod:`patchalign.engine.build` for the stages and their on-disk caches,
:mod:`patchalign.engine.sources.demo` for the built-in procedural demo data and its split, and
:mod:`patchalign.engine.sources.find3d` for the Find3D data-engine layout the labels stage reads.
"""

from patchalign.engine.backproject import (
    BackprojectionResult,
    NoVisiblePointsError,
    backproject_features,
    face_feature_sums,
    fill_unseen,
)
from patchalign.engine.build import (
    STAGES,
    EngineConfig,
    ObjectRecord,
    StageStats,
    WorkDir,
    chunk_records,
    discover_meshes,
    load_records,
    run_build,
    save_records,
)
from patchalign.engine.sampling import SurfaceSample, sample_surface
from patchalign.engine.sources.find3d import find3d_records

__all__ = [
    "STAGES",
    "BackprojectionResult",
    "EngineConfig",
    "NoVisiblePointsError",
    "ObjectRecord",
    "StageStats",
    "SurfaceSample",
    "WorkDir",
    "backproject_features",
    "chunk_records",
    "discover_meshes",
    "face_feature_sums",
    "fill_unseen",
    "find3d_records",
    "load_records",
    "run_build",
    "sample_surface",
    "save_records",
]
