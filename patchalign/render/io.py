"""Mesh loading for rendering: any trimesh-readable file as one triangle mesh in the unit sphere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["MeshLoadError", "MeshFileNotFoundError", "load_mesh_normalized", "normalize_to_unit_sphere"]


class MeshLoadError(ValueError):
    """A mesh file could not be turned into a renderable triangle mesh (empty, no faces, not finite)."""


class MeshFileNotFoundError(MeshLoadError, FileNotFoundError):
    """The mesh path does not exist (catchable as ``ValueError`` and as ``FileNotFoundError``)."""


def normalize_to_unit_sphere(vertices: Tensor, faces: Tensor) -> Tensor:
    """Centre on the bounding-box centre and scale so the farthest used vertex is at distance 1.

    The bounding box (not the vertex mean) is the centre because vertex density is arbitrary on
    meshes (a detailed handle would drag the mean). Only vertices referenced by a face count, so stray
    unreferenced vertices in a file cannot shrink the shape.
    """
    used = vertices[torch.unique(faces)]
    centre = (used.min(dim=0).values + used.max(dim=0).values) / 2
    scale = (used - centre).norm(dim=-1).max()
    if not bool(scale > 0):
        raise MeshLoadError("mesh has zero extent (all face vertices coincide)")
    return (vertices - centre) / scale


def load_mesh_normalized(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Load ``path`` (.obj/.ply/.glb/... anything trimesh reads) as one unit-sphere triangle mesh.

    Scenes (glTF/GLB with several nodes) are merged into one mesh with their node transforms applied.
    Vertex and face order are kept as in the file (``process=False``), so face indices stay
    meaningful for annotations that refer to them (e.g. KeypointNet's ``mesh_info.face_index``).

    Returns:
        vertices (n,3) float32 centred and scaled into the unit sphere, faces (m,3) long.

    Raises:
        MeshFileNotFoundError: ``path`` does not exist (a ``ValueError`` and a ``FileNotFoundError``).
        MeshLoadError: the file holds no triangles (empty file, empty scene, a point cloud) or
            non-finite vertices, or trimesh cannot parse it.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise MeshFileNotFoundError(2, "mesh file not found", str(path))
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as error:  # trimesh raises many types for unreadable files
        raise MeshLoadError(f"could not load mesh {path}: {error}") from error
    faces_np = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    vertices_np = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
    if faces_np.shape[0] == 0 or vertices_np.shape[0] == 0:
        raise MeshLoadError(
            f"mesh {path} has no triangles ({vertices_np.shape[0]} vertices, {faces_np.shape[0]} faces)"
        )
    if not np.isfinite(vertices_np).all():
        raise MeshLoadError(f"mesh {path} has NaN or inf vertex coordinates")
    if faces_np.min() < 0 or faces_np.max() >= vertices_np.shape[0]:
        raise MeshLoadError(f"mesh {path} has face indices outside its {vertices_np.shape[0]} vertices")
    faces = torch.from_numpy(faces_np)
    vertices = normalize_to_unit_sphere(torch.from_numpy(vertices_np), faces).to(torch.float32)
    return vertices, faces
