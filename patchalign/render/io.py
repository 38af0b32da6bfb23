"""Mesh loading for rendering: any trimesh-readable file as one triangle mesh in the unit sphere.

The file is read by :func:`patchalign.io.load_geometry` (the one mesh reader) and normalised about
its bounding-box centre (:func:`patchalign.geometry.unit_sphere_bbox`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, overload

import torch
from torch import Tensor

from patchalign.geometry import DegenerateShapeError, UnitSphereTransform, unit_sphere_bbox
from patchalign.io import GeometryLoadError, load_geometry

__all__ = [
    "MeshLoadError",
    "MeshFileNotFoundError",
    "MeshNormalization",
    "load_mesh_normalized",
    "unit_sphere_normalization",
]


class MeshLoadError(ValueError):
    """A mesh file could not be turned into a renderable triangle mesh (empty, no faces, not finite)."""


class MeshFileNotFoundError(MeshLoadError, FileNotFoundError):
    """The mesh path does not exist (catchable as ``ValueError`` and as ``FileNotFoundError``)."""


#: The similarity :func:`load_mesh_normalized` undid (``original = normalised * scale + centre``);
#: the one bounding-box convention of :mod:`patchalign.geometry`, under the name this module has
#: always exported.
MeshNormalization = UnitSphereTransform


def unit_sphere_normalization(vertices: Tensor, faces: Tensor) -> MeshNormalization:
    """Bounding-box centre and farthest-vertex radius of the vertices that faces use
    (:func:`patchalign.geometry.unit_sphere_bbox`; a zero-extent mesh is a :class:`MeshLoadError`).

    The bounding box (not the vertex mean) is the centre because vertex density is arbitrary on
    meshes (a detailed handle would drag the mean).
    """
    try:
        return unit_sphere_bbox(vertices, faces)
    except DegenerateShapeError as e:
        raise MeshLoadError("mesh has zero extent (all face vertices coincide)") from e


@overload
def load_mesh_normalized(
    path: str | os.PathLike, return_transform: Literal[False] = False
) -> tuple[Tensor, Tensor]: ...


@overload
def load_mesh_normalized(
    path: str | os.PathLike, return_transform: Literal[True]
) -> tuple[Tensor, Tensor, MeshNormalization]: ...


def load_mesh_normalized(
    path: str | os.PathLike, return_transform: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, MeshNormalization]:
    """Load ``path`` (.obj/.ply/.glb/... anything trimesh reads) as one unit-sphere triangle mesh.

    Scenes (glTF/GLB with several nodes) are merged into one mesh with their node transforms applied.
    Vertex and face order are kept as in the file (``process=False``), so face indices stay
    meaningful for annotations that refer to them (e.g. KeypointNet's ``mesh_info.face_index``).

    Args:
        path: the mesh file.
        return_transform: also return the :class:`MeshNormalization` (centre, scale) that was applied,
            so results in the normalised frame can be mapped back to the file's coordinates
            (``original = normalised * scale + centre``) or the transform recorded with them.

    Returns:
        vertices (n,3) float32 centred and scaled into the unit sphere, faces (m,3) long, and with
        ``return_transform=True`` the :class:`MeshNormalization` as a third element.

    Raises:
        MeshFileNotFoundError: ``path`` does not exist (a ``ValueError`` and a ``FileNotFoundError``).
        MeshLoadError: the file holds no triangles (empty file, empty scene, a point cloud) or
            non-finite vertices, or trimesh cannot parse it.
    """
    path = Path(path)
    if not path.is_file():
        raise MeshFileNotFoundError(2, "mesh file not found", str(path))
    try:
        vertices_np, faces_np = load_geometry(path)
    except GeometryLoadError as error:
        raise MeshLoadError(f"could not load mesh {error}") from error
    n_faces = 0 if faces_np is None else faces_np.shape[0]
    if n_faces == 0 or vertices_np.shape[0] == 0:
        raise MeshLoadError(
            f"mesh {path} has no triangles ({vertices_np.shape[0]} vertices, {n_faces} faces)"
        )
    faces = torch.from_numpy(faces_np)
    vertices = torch.from_numpy(vertices_np)
    transform = unit_sphere_normalization(vertices, faces)
    vertices = transform.to_normalized(vertices).to(torch.float32)
    if return_transform:
        return vertices, faces, transform
    return vertices, faces
