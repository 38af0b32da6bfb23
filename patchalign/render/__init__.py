"""Rendering for the data engine and ZeroKey: cameras, view layouts, mesh and point-cloud renderers.

Everything shares one OpenCV-convention camera model (:class:`Cameras`); mesh rendering has an Embree
(CPU) and a PyTorch3D (GPU) backend that return the same per-pixel face correspondences.
"""

from patchalign.render.cameras import (
    Cameras,
    find3d_cameras,
    find3d_view_layout,
    fov_to_fit_unit_sphere,
    look_at_cameras,
    ring_view_layout,
    spherical_eyes,
)
from patchalign.render.io import (
    MeshFileNotFoundError,
    MeshLoadError,
    MeshNormalization,
    load_mesh_normalized,
    unit_sphere_normalization,
)
from patchalign.render.mesh import RenderOutput, face_normals, render_mesh, shade_faces
from patchalign.render.points import PointRenderOutput, render_points

__all__ = [
    "Cameras",
    "MeshFileNotFoundError",
    "MeshLoadError",
    "MeshNormalization",
    "PointRenderOutput",
    "RenderOutput",
    "face_normals",
    "find3d_cameras",
    "find3d_view_layout",
    "fov_to_fit_unit_sphere",
    "load_mesh_normalized",
    "look_at_cameras",
    "render_mesh",
    "render_points",
    "ring_view_layout",
    "shade_faces",
    "spherical_eyes",
    "unit_sphere_normalization",
]
