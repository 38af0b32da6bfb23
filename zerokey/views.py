"""Rendering a shape's views for ZeroKey (meshes and point clouds alike) on top of ``patchalign.render``.

View layouts (:func:`view_layout`): the paper renders 26 views and ablates 6 and 46 (arXiv:2412.06292);
the view placements here are ours, chosen to cover the sphere evenly (docs/fidelity.md).
Azimuth is about +y (0 = +z, 90 = +x), polar angle from +y; the two "pole" views sit ``pole_tilt_deg``
off the exact poles (towards +z) because ``look_at`` with up = +y is degenerate there.

* **6**: the axis views -- azimuths 0 / 90 / 180 / 270 at the equator, plus top and bottom;
* **26** (default): 8 azimuths (0, 45, ..., 315) at polar 45 / 90 / 135, then the poles;
* **46**: rings at polar 30 / 60 / 90 / 120 / 150 with 6 / 10 / 12 / 10 / 6 azimuths (about
  proportional to the ring's circumference, each ring starting at azimuth 0), then the poles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from patchalign.render import (
    Cameras,
    fov_to_fit_unit_sphere,
    look_at_cameras,
    render_mesh,
    render_points,
    ring_view_layout,
)
from zerokey.data import ShapeSample
from zerokey.original import ORIGINAL_PARTITIONS, original_cameras, original_shading, position_colors

__all__ = [
    "project_visible",
    "RenderedViews",
    "ViewConfig",
    "VIEW_RINGS",
    "view_layout",
    "make_cameras",
    "shape_cameras",
    "render_shape",
    "auto_point_radius",
]

#: (polar angle, number of azimuths) rings of each layout; every layout adds the two pole views.
VIEW_RINGS: dict[int, tuple[tuple[float, int], ...]] = {
    6: ((90.0, 4),),
    26: ((45.0, 8), (90.0, 8), (135.0, 8)),
    46: ((30.0, 6), (60.0, 10), (90.0, 12), (120.0, 10), (150.0, 6)),
}


def view_layout(n_views: int = 26, distance: float = 2.5, pole_tilt_deg: float = 5.0) -> Tensor:
    """(n_views, 3) eye positions of the 6 / 26 / 46-view layouts (module docstring), rings
    polar-major, then the top and bottom views (:func:`patchalign.render.ring_view_layout`)."""
    if n_views not in VIEW_RINGS:
        raise ValueError(f"n_views must be one of {sorted(VIEW_RINGS)} (the paper's layouts), got {n_views}")
    if not 0.0 < pole_tilt_deg < 30.0:
        raise ValueError(f"pole_tilt_deg must be in (0, 30), got {pole_tilt_deg}")
    return ring_view_layout(VIEW_RINGS[n_views], distance, pole_tilt_deg)


@dataclass
class RenderedViews:
    """Everything later stages need from the renders of one shape.

    ``pix_to_face``/``bary`` are set for meshes, ``pix_to_point`` for point clouds; ``depth`` (view z,
    +inf background) and ``mask`` always.
    """

    images: Tensor  # (V,H,W,3) float [0,1]
    cameras: Cameras
    depth: Tensor  # (V,H,W)
    mask: Tensor  # (V,H,W) bool
    pix_to_face: Tensor | None = None  # (V,H,W) long
    bary: Tensor | None = None  # (V,H,W,3)
    pix_to_point: Tensor | None = None  # (V,H,W) long

    @property
    def n_views(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.cameras.image_size


@dataclass
class ViewConfig:
    """Camera / renderer settings.

    Attributes:
        image_size: pixels per side. The multimodal models see these images; Molmo tiles its input into
            336 px crops, so ~336-512 px is the useful range; CPU render cost grows with its square.
        distance: camera distance from the origin (shapes are in the unit sphere).
        fov_deg: full field of view; None fits the unit sphere with 5% margin.
        pole_tilt_deg: tilt of the two pole views (see :func:`view_layout`).
        backend: mesh backend ("auto": PyTorch3D on CUDA, Embree on CPU).
        point_backend: point-cloud backend ("auto": PyTorch3D on CUDA, torch splatting otherwise).
        point_radius: disc radius for point clouds in normalised units; None picks it from the point
            spacing (see :func:`auto_point_radius`) so sparse clouds render without holes.
        n_views: 6, 26 (paper default) or 46 (the paper's ablation), see :func:`view_layout`.
        layout: "ours" (:func:`view_layout` around the origin of the unit-sphere frame) or "original"
            (the authors' code, :func:`zerokey.original.original_cameras`: 26 directions tilted 0.001 rad
            about +x, looking at the vertex mean from ``distance`` in the *input* frame's units -- 1 for
            KeypointNet's unit-diagonal meshes; set ``fov_deg: 60``; ``n_views`` 26, or 6 for the
            authors' "only 6 views" ablation; ``pole_tilt_deg`` is unused).
        shading: "ours" (the renderer's headlight Lambertian grey) or "original" (PyTorch3D flat
            shading, light at the camera with ambient 0.5 / diffuse 0.3 / specular 0.2, grey 0.7 on white:
            :func:`zerokey.original.original_shading`; meshes only, point clouds keep ours).
        texture: with ``shading: original``, the surface colour: "grey" (0.7, the pipeline), or the
            authors' ablations "vertex_colors" (the mesh file's per-vertex RGB: "Textured") and
            "position" (min-max normalised xyz: "Position Map").
    """

    image_size: int = 448
    distance: float = 2.5
    fov_deg: float | None = None
    pole_tilt_deg: float = 5.0
    backend: Literal["auto", "embree", "pytorch3d"] = "auto"
    point_backend: Literal["auto", "cpu", "pytorch3d"] = "auto"
    point_radius: float | None = None
    n_views: int = 26
    layout: Literal["ours", "original"] = "ours"
    shading: Literal["ours", "original"] = "ours"
    texture: Literal["grey", "vertex_colors", "position"] = "grey"

    def __post_init__(self) -> None:
        # a bad layout is refused when the config is read, not once per shape
        if self.layout not in ("ours", "original"):
            raise ValueError(f"views.layout must be 'ours' or 'original', got {self.layout!r}")
        if self.shading not in ("ours", "original"):
            raise ValueError(f"views.shading must be 'ours' or 'original', got {self.shading!r}")
        if self.texture not in ("grey", "vertex_colors", "position"):
            raise ValueError(f"views.texture must be grey, vertex_colors or position, got {self.texture!r}")
        if self.texture != "grey" and self.shading != "original":
            raise ValueError(f"views.texture {self.texture!r} needs views.shading 'original'")
        if self.layout == "original":
            if self.n_views not in ORIGINAL_PARTITIONS:
                raise ValueError(
                    f"views.layout 'original' has {sorted(ORIGINAL_PARTITIONS)} views, not {self.n_views}"
                )
            if self.distance <= 0:
                raise ValueError(f"views.distance must be > 0, got {self.distance}")
        else:
            view_layout(self.n_views, self.distance, self.pole_tilt_deg)
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")


def make_cameras(config: ViewConfig, device: torch.device | str = "cpu") -> Cameras:
    """The configured view layout as cameras looking at the origin (``layout="ours"``; the original
    layout depends on the shape: :func:`shape_cameras`)."""
    if config.layout == "original":
        raise ValueError("views.layout 'original' places cameras per shape: use shape_cameras(config, shape)")
    eyes = view_layout(config.n_views, config.distance, config.pole_tilt_deg)
    fov = config.fov_deg if config.fov_deg is not None else fov_to_fit_unit_sphere(config.distance)
    return look_at_cameras(eyes, fov_deg=fov, image_size=config.image_size).to(device)


def shape_cameras(config: ViewConfig, shape: ShapeSample, device: torch.device | str = "cpu") -> Cameras:
    """Cameras for one shape: the original layout around its vertex mean, else :func:`make_cameras`."""
    if config.layout != "original":
        return make_cameras(config, device)
    fov = config.fov_deg if config.fov_deg is not None else 60.0
    return original_cameras(
        shape.vertices.to(device),
        shape.scale,
        config.distance,
        fov,
        config.image_size,
        n_views=config.n_views,
    ).to(device)


def vertex_texture(shape: ShapeSample, texture: str) -> Tensor | None:
    """Per-vertex colours (N,3) in [0, 1] for ``ViewConfig.texture`` (None for grey). "vertex_colors" reads
    the mesh file again (``trimesh``, ``process=False``: the vertex order of our reader); a file without
    one colour per vertex is a clear error."""
    if texture == "grey":
        return None
    if texture == "position":
        return position_colors(shape.vertices)
    import trimesh

    mesh = trimesh.load(shape.source, force="mesh", process=False)
    colors = getattr(getattr(mesh, "visual", None), "vertex_colors", None)
    if (
        colors is None
        or len(colors) != shape.vertices.shape[0]
        or getattr(mesh.visual, "kind", None) != "vertex"
    ):
        raise ValueError(f"views.texture vertex_colors: {shape.source} has no colour per vertex")
    return torch.as_tensor(
        np.asarray(colors)[:, :3] / 255.0, dtype=torch.float32, device=shape.vertices.device
    )


def auto_point_radius(points: Tensor, factor: float = 1.5) -> float:
    """Disc radius from the cloud's spacing: ``factor`` x the mean distance to the nearest neighbour.

    Discs of about half the spacing leave holes; ~0.75 closes them on KeypointNet's 2048-point clouds
    while staying small enough that thin parts (wings, legs) do not bleed. A k-d tree query (ms for
    thousands of points).
    """
    if points.shape[0] < 2:
        return 0.01
    from scipy.spatial import cKDTree

    xyz = points.detach().cpu().double().numpy()
    distance, _ = cKDTree(xyz).query(xyz, k=2)
    spacing = distance[:, 1][distance[:, 1] > 0]  # exact duplicates would report 0
    return float(factor * spacing.mean()) if spacing.size else 0.01


def render_shape(shape: ShapeSample, cameras: Cameras, config: ViewConfig) -> RenderedViews:
    """Render a mesh (face correspondences) or a point cloud (point correspondences) from all views."""
    if shape.is_mesh:
        out = render_mesh(shape.vertices, shape.faces, cameras, backend=config.backend)
        image = out.image
        if config.shading == "original":
            colors = vertex_texture(shape, config.texture)
            image = original_shading(
                out.pix_to_face, shape.vertices, shape.faces, cameras, vertex_colors=colors, bary=out.bary
            )
        return RenderedViews(
            images=image,
            cameras=cameras,
            depth=out.depth,
            mask=out.mask,
            pix_to_face=out.pix_to_face,
            bary=out.bary,
        )
    radius = config.point_radius if config.point_radius is not None else auto_point_radius(shape.vertices)
    out = render_points(shape.vertices, cameras, radius=radius, backend=config.point_backend)
    return RenderedViews(
        images=out.image, cameras=cameras, depth=out.depth, mask=out.mask, pix_to_point=out.pix_to_point
    )


def project_visible(
    xyz: Tensor, views: RenderedViews, depth_tolerance: float = 0.03
) -> tuple[Tensor, Tensor]:
    """Project 3D points into every view: ``uv (V, P, 2)`` pixels and ``visible (V, P)``.

    A point is visible in a view when it is in front of the camera, inside the image, and passes a
    depth test against the rendered depth at its pixel (``|depth_render - depth_point| <= depth_tolerance``,
    i.e. no other surface hides it).
    """
    uv, z = views.cameras.project(xyz)
    size = views.image_size
    inside = (z > 0) & (uv >= 0).all(-1) & (uv < size).all(-1)
    pix = torch.where(inside[..., None], uv.floor().long(), torch.zeros_like(uv, dtype=torch.long))
    view_ids = torch.arange(views.n_views, device=xyz.device)[:, None].expand_as(z)
    rendered = views.depth[view_ids, pix[..., 1], pix[..., 0]]
    return uv, inside & ((rendered - z).abs() <= depth_tolerance)
