"""Object sources of the data engine, as plug-ins.

The engine's stages (sample, render, labels, write) are the same for every object; what differs is
where an object comes from. A source answers five questions about one :class:`ObjectRecord` of its
``source`` kind, and the engine never branches on the kind:

``mesh(record)``
    unit-sphere-normalised ``(vertices, faces, normalisation)``, for sampling and rendering;
``points(record, frame)``
    points and face ids the source already has (Find3D ships them), or ``None``: sample the mesh;
``views(record)``
    rendered ``(images, pix_to_face)`` the source already has (Find3D), or ``None``: render the mesh;
``labels(record, face_ids)``
    per-point membership ``(N, L)`` and part names (``L = 0``: unlabelled);
``meta(record)``
    extra fields for the written sample's meta.

Built-in kinds: ``mesh`` (a mesh file, :class:`MeshSource`), ``demo`` (procedural part-labelled
meshes, :class:`patchalign.engine.sources.demo.DemoSource`) and ``find3d`` (Find3D's data-engine output,
:class:`patchalign.engine.sources.find3d.Find3DSource`). Plug-ins are found by module path, so the engine
imports none of them; :func:`register_source` adds one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from patchalign.render import load_mesh_normalized

if TYPE_CHECKING:
    from patchalign.engine.records import ObjectRecord

__all__ = ["MeshSource", "ObjectSource", "register_source", "source_of"]


class ObjectSource:
    """The defaults every source starts from: no stored points, views, labels or extra meta."""

    kind = ""

    def mesh(self, record: ObjectRecord) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        raise ValueError(f"record {record.uid} (source {record.source!r}) has no mesh")

    def points(self, record: ObjectRecord, frame: str) -> dict[str, Any] | None:
        """Stored ``points`` / ``face_ids`` / ``normalization`` (JSON) in ``frame``, or ``None``."""
        return None

    def views(self, record: ObjectRecord) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def labels(self, record: ObjectRecord, face_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Unlabelled by default: such shards still carry teacher features for Stage 1."""
        return np.zeros((face_ids.shape[0], 0), dtype=bool), []

    def meta(self, record: ObjectRecord) -> dict[str, Any]:
        return {}


class MeshSource(ObjectSource):
    """A mesh file (``.glb/.obj/.ply/...``), centred on its bounding box, max radius 1."""

    kind = "mesh"

    def mesh(self, record: ObjectRecord) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        verts, faces, norm = load_mesh_normalized(record.path, return_transform=True)
        return (
            verts,
            faces,
            {
                "centre": norm.centre.tolist(),
                "scale": float(norm.scale),
                "method": "bbox centre, max radius 1 (patchalign.render.load_mesh_normalized)",
            },
        )


#: kind -> "module:Class" of its plug-in (instantiated on first use) or a registered instance.
_SOURCES: dict[str, str | ObjectSource] = {
    "mesh": "patchalign.engine.sources:MeshSource",
    "demo": "patchalign.engine.sources.demo:DemoSource",
    "find3d": "patchalign.engine.sources.find3d:Find3DSource",
}


def register_source(kind: str, source: ObjectSource | str) -> None:
    """Make records with ``source == kind`` use ``source`` (an instance or ``"module:Class"``)."""
    _SOURCES[kind] = source


def source_of(record: ObjectRecord) -> ObjectSource:
    """The plug-in of ``record.source``."""
    entry = _SOURCES.get(record.source)
    if entry is None:
        raise ValueError(f"record {record.uid}: unknown source {record.source!r}; known: {sorted(_SOURCES)}")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)()
        _SOURCES[record.source] = entry
    return entry
