"""Pinhole cameras in the OpenCV convention, batched over views, in plain torch.

One camera model is shared by every renderer backend (Embree ray casting, PyTorch3D rasterization,
CPU point splatting) so that a pixel means the same thing everywhere:

* view frame: x right, y down, z forward; a point is in front of the camera when ``z_view > 0`` and
  its depth is ``z_view`` (not the distance to the camera centre);
* ``x_view = R @ x_world + T`` with ``R`` (V,3,3) whose rows are the camera axes in world coordinates;
* pixel ``(u, v)``: ``u`` is the column, ``v`` the row, and pixel ``(col j, row i)`` covers
  ``[j, j+1) x [i, i+1)`` so its centre is at ``(j + 0.5, i + 0.5)``. The principal point is the image
  centre ``(S/2, S/2)``, so ``u = f * x / z + S/2``. ``floor(uv)`` is the pixel a point falls in.

This is the convention ``pytorch3d.utils.cameras_from_opencv_projection`` expects (it maps the principal
point ``S/2`` to NDC 0, the image centre), which is why the PyTorch3D backend needs no half-pixel shifts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Cameras",
    "look_at_cameras",
    "find3d_view_layout",
    "ring_view_layout",
    "spherical_eyes",
    "fov_to_fit_unit_sphere",
    "find3d_cameras",
]

# Find3D's framing (ziqi-ma/Find3D dataengine/utils/meshutils.py ``normalize_mesh`` and rendering/
# render_2d.py): shapes are scaled so max |coordinate| = 0.75 and seen through FoVOrthographicCameras
# with the default [-1, 1] window at 500 px.
FIND3D_SHAPE_HALF_EXTENT = 0.75
FIND3D_WINDOW_HALF_WIDTH = 1.0
FIND3D_IMAGE_SIZE = 500


@dataclass(eq=False)
class Cameras:
    """A batch of ``V`` square perspective pinhole cameras sharing one image size.

    Attributes:
        R: (V,3,3) world->view rotation; rows are the camera's right/down/forward axes in world frame.
        T: (V,3) world->view translation, ``x_view = R @ x_world + T``.
        focal: (V,) focal length in pixels (same for x and y: square pixels).
        image_size: H = W of every view, in pixels.
    """

    R: Tensor
    T: Tensor
    focal: Tensor
    image_size: int

    def __post_init__(self) -> None:
        if self.R.ndim != 3 or self.R.shape[1:] != (3, 3):
            raise ValueError(f"Cameras.R must be (V,3,3), got {tuple(self.R.shape)}")
        n_views = self.R.shape[0]
        if self.T.shape != (n_views, 3):
            raise ValueError(f"Cameras.T must be ({n_views},3), got {tuple(self.T.shape)}")
        if self.focal.shape != (n_views,):
            raise ValueError(f"Cameras.focal must be ({n_views},), got {tuple(self.focal.shape)}")
        if int(self.image_size) != self.image_size or self.image_size < 1:
            raise ValueError(f"Cameras.image_size must be a positive int, got {self.image_size!r}")
        self.image_size = int(self.image_size)

    # ------------------------------------------------------------------ basic accessors
    def __len__(self) -> int:
        return self.R.shape[0]

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Cameras:
        """A subset of the views (keeps the batch dimension, also for an int index)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Cameras(self.R[index], self.T[index], self.focal[index], self.image_size)

    @property
    def device(self) -> torch.device:
        return self.R.device

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(self.R.to(device), self.T.to(device), self.focal.to(device), self.image_size)

    @property
    def centers(self) -> Tensor:
        """(V,3) camera positions in world coordinates: ``-R^T T``."""
        return -(self.R.transpose(1, 2) @ self.T.unsqueeze(-1)).squeeze(-1)

    @property
    def principal_point(self) -> float:
        """The principal point (both coordinates): the image centre, in the +0.5 pixel-centre convention."""
        return self.image_size / 2.0

    @property
    def K(self) -> Tensor:
        """(V,3,3) OpenCV intrinsic matrices ``[[f,0,c],[0,f,c],[0,0,1]]`` with ``c = S/2``."""
        n_views = len(self)
        K = torch.zeros(n_views, 3, 3, dtype=self.focal.dtype, device=self.device)
        K[:, 0, 0] = self.focal
        K[:, 1, 1] = self.focal
        K[:, :2, 2] = self.principal_point
        K[:, 2, 2] = 1.0
        return K

    # ------------------------------------------------------------------ geometry
    def world_to_view(self, points: Tensor) -> Tensor:
        """(P,3) world points -> (V,P,3) view-frame points."""
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must be (P,3), got {tuple(points.shape)}")
        points = points.to(self.R)
        return torch.einsum("vij,pj->vpi", self.R, points) + self.T[:, None, :]

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project (P,3) world points into every view.

        Returns ``uv`` (V,P,2) pixel coordinates (column, row; pixel centres at +0.5) and ``depth``
        (V,P) = view-space z. Points at or behind the camera plane get non-finite / meaningless uv; callers
        decide with ``depth > 0`` whether a point is visible at all.
        """
        x_view = self.world_to_view(points)
        depth = x_view[..., 2]
        uv = self.focal[:, None, None] * x_view[..., :2] / depth.unsqueeze(-1) + self.principal_point
        return uv, depth

    def unproject(self, uv: Tensor, depth: Tensor) -> Tensor:
        """Invert :meth:`project`: (V,K,2) pixel coordinates and (V,K) view depths -> (V,K,3) world points."""
        if uv.ndim != 3 or uv.shape[0] != len(self) or uv.shape[-1] != 2:
            raise ValueError(f"uv must be ({len(self)},K,2), got {tuple(uv.shape)}")
        if depth.shape != uv.shape[:2]:
            raise ValueError(f"depth must be {tuple(uv.shape[:2])}, got {tuple(depth.shape)}")
        uv = uv.to(self.R)
        depth = depth.to(self.R)
        xy = (uv - self.principal_point) / self.focal[:, None, None] * depth.unsqueeze(-1)
        x_view = torch.cat([xy, depth.unsqueeze(-1)], dim=-1)
        # x_world = R^T (x_view - T); for row vectors that is (x_view - T) @ R.
        return (x_view - self.T[:, None, :]) @ self.R

    def pixel_directions(self) -> Tensor:
        """(V,H,W,3) world-frame ray directions through every pixel centre, scaled so view-z == 1.

        Scaling to unit view-z (instead of unit length) makes the ray parameter of a hit equal to its
        depth, which is what the renderers return; shading normalises these itself.
        """
        size = self.image_size
        centres = torch.arange(size, dtype=self.R.dtype, device=self.device) + 0.5
        rows, cols = torch.meshgrid(centres, centres, indexing="ij")
        offset = self.principal_point
        x = (cols - offset)[None] / self.focal[:, None, None]
        y = (rows - offset)[None] / self.focal[:, None, None]
        d_view = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (V,H,W,3)
        return torch.einsum("vhwi,vij->vhwj", d_view, self.R)


def _as_batch(vectors: Tensor | Sequence[float], n_views: int, like: Tensor, name: str) -> Tensor:
    out = torch.as_tensor(vectors, dtype=like.dtype, device=like.device)
    if out.shape == (3,):
        out = out.expand(n_views, 3)
    if out.shape != (n_views, 3):
        raise ValueError(f"{name} must be (3,) or ({n_views},3), got {tuple(out.shape)}")
    return out


def look_at_cameras(
    eye: Tensor,
    at: Tensor | Sequence[float] | None = None,
    up: Tensor | Sequence[float] = (0.0, 1.0, 0.0),
    fov_deg: float = 60.0,
    image_size: int = 512,
) -> Cameras:
    """Cameras at ``eye`` (V,3) looking at ``at`` (default: the origin) with world ``up`` pointing up.

    The camera's forward axis is ``at - eye``, right is ``forward x up`` and down is ``forward x right``
    (so ``up`` projects to the top of the image). When ``forward`` is (nearly) parallel to ``up`` the
    right axis is undefined; those views fall back to the world axis least aligned with ``forward`` as
    their up vector instead of producing NaNs, which is what lets pole views be built safely.

    ``fov_deg`` is the full field of view of the square image; ``focal = (S/2) / tan(fov/2)``.
    """
    eye = torch.as_tensor(eye)
    if not eye.is_floating_point():
        eye = eye.float()
    if eye.ndim == 1:
        eye = eye[None]
    if eye.ndim != 2 or eye.shape[-1] != 3:
        raise ValueError(f"eye must be (V,3), got {tuple(eye.shape)}")
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    n_views = eye.shape[0]
    at_t = _as_batch((0.0, 0.0, 0.0) if at is None else at, n_views, eye, "at")
    up_t = _as_batch(up, n_views, eye, "up")

    forward = at_t - eye
    norm = forward.norm(dim=-1, keepdim=True)
    if bool((norm < 1e-12).any()):
        raise ValueError("look_at_cameras: eye coincides with the look-at point for some view")
    forward = forward / norm
    right = torch.linalg.cross(forward, up_t, dim=-1)
    right_norm = right.norm(dim=-1, keepdim=True)
    degenerate = right_norm.squeeze(-1) < 1e-6 * up_t.norm(dim=-1).clamp_min(1e-12)
    if bool(degenerate.any()):
        # Fallback up: the world axis least aligned with forward (never parallel to it).
        axes = torch.eye(3, dtype=eye.dtype, device=eye.device)
        least = forward.abs().argmin(dim=-1)
        alt_right = torch.linalg.cross(forward, axes[least], dim=-1)
        right = torch.where(degenerate[:, None], alt_right, right)
        right_norm = right.norm(dim=-1, keepdim=True)
    right = right / right_norm
    down = torch.linalg.cross(forward, right, dim=-1)
    R = torch.stack([right, down, forward], dim=1)  # rows = camera axes
    T = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    focal_value = (image_size / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    focal = torch.full((n_views,), focal_value, dtype=eye.dtype, device=eye.device)
    return Cameras(R=R, T=T, focal=focal, image_size=image_size)


def spherical_eyes(azimuth_deg: Tensor, polar_deg: Tensor, distance: float) -> Tensor:
    """Camera positions from azimuth about +y (0 deg = +z, 90 deg = +x) and polar angle from +y.

    This is PyTorch3D's ``look_at_view_transform`` placement (elevation = 90 - polar), which Find3D
    uses, so layouts built here put cameras where theirs are.
    """
    az = torch.deg2rad(azimuth_deg.to(torch.float32))
    polar = torch.deg2rad(polar_deg.to(torch.float32))
    return distance * torch.stack(
        [torch.sin(polar) * torch.sin(az), torch.cos(polar), torch.sin(polar) * torch.cos(az)], dim=-1
    )


def find3d_view_layout(n_views: int = 10, distance: float = 2.5) -> Tensor:
    """Find3D's data-engine camera ring: (V,3) eye positions, elevations alternating +30 / -20 degrees.

    Mirrors ``get_cameras`` in ziqi-ma/Find3D ``dataengine/rendering/render_2d.py`` (commit 44e6d65):
    ``elev = tile([30, -20], n_views // 2)`` and ``azim = linspace(-180, 180, n_views, endpoint=False)``,
    placed with PyTorch3D's ``look_at_view_transform(dist, elev, azim)`` (up = +y). View ``i`` therefore
    sits at azimuth ``-180 + 360 i / V`` and elevation 30 for even ``i``, -20 for odd ``i``. For odd
    ``n_views`` (which their ``tile`` cannot express) the alternation simply continues.

    Differences, on purpose: Find3D renders with ``FoVOrthographicCameras`` at ``dist=3`` (a fixed
    [-1, 1] window, 500 px); our cameras are perspective, so the default distance is 2.5 and a field of
    view from :func:`fov_to_fit_unit_sphere` keeps a unit-sphere-normalised shape fully in frame.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if distance <= 0:
        raise ValueError(f"distance must be > 0, got {distance}")
    index = torch.arange(n_views)
    elevation = torch.where(index % 2 == 0, 30.0, -20.0)
    azimuth = -180.0 + 360.0 * index.to(torch.float32) / n_views
    return spherical_eyes(azimuth, 90.0 - elevation, distance)


def ring_view_layout(
    rings: Sequence[tuple[float, int]], distance: float = 2.5, pole_tilt_deg: float | None = 5.0
) -> Tensor:
    """Eyes on rings of a sphere of radius ``distance`` around the origin, then (optionally) two poles.

    ``rings`` is ``((polar_deg, count), ...)``: ``count`` azimuths evenly spaced from 0 (about +y,
    0 = +z, 90 = +x) at polar angle ``polar_deg`` from +y, rings in the given order. With
    ``pole_tilt_deg`` the top and bottom views follow, ``pole_tilt_deg`` away from the exact poles
    (towards +z): ``look_at`` with up = +y is degenerate at a pole. Returns (sum(count) [+ 2], 3).

    A generic layout: consumers name their own rings (ZeroKey's 6 / 26 / 46 views live in
    :func:`zerokey.views.view_layout`; the 26-view sphere is ``((45, 8), (90, 8), (135, 8))``).
    """
    if distance <= 0:
        raise ValueError(f"distance must be > 0, got {distance}")
    if pole_tilt_deg is not None and not 0.0 < pole_tilt_deg < 90.0:
        raise ValueError(f"pole_tilt_deg must be in (0, 90), got {pole_tilt_deg}")
    if any(count < 1 for _, count in rings):
        raise ValueError(f"every ring needs >= 1 view, got {list(rings)}")
    azimuth = [torch.arange(count, dtype=torch.float32) * (360.0 / count) for _, count in rings]
    polar = [torch.full((count,), float(ring_polar)) for ring_polar, count in rings]
    if pole_tilt_deg is not None:
        azimuth.append(torch.zeros(2))
        polar.append(torch.tensor([pole_tilt_deg, 180.0 - pole_tilt_deg]))
    if not azimuth:
        raise ValueError("a layout needs at least one ring or the pole views")
    return spherical_eyes(torch.cat(azimuth), torch.cat(polar), distance)


def fov_to_fit_unit_sphere(distance: float, margin: float = 1.05) -> float:
    """Full field of view (degrees) at which a sphere of radius ``margin`` centred at the origin fills
    the image of a camera at ``distance`` looking at the origin (its silhouette cone half-angle is
    ``asin(margin / distance)``)."""
    if distance <= margin:
        raise ValueError(f"camera at distance {distance} is inside the sphere of radius {margin}")
    return math.degrees(2.0 * math.asin(margin / distance))


def find3d_cameras(n_views: int = 10, image_size: int = FIND3D_IMAGE_SIZE, distance: float = 2.5) -> Cameras:
    """Perspective stand-in for Find3D's 10 orthographic views of a unit-sphere-normalised shape.

    Cameras sit on :func:`find3d_view_layout` and look at the origin with up = +y. Find3D shows a shape
    of half-extent 0.75 in a half-width-1 orthographic window; with our unit-sphere normalisation the
    same framing is a half-width of 1 / 0.75 world units in the plane through the origin, i.e.
    ``fov = 2 atan((1 / 0.75) / distance)`` (about 56 degrees at distance 2.5, wide enough that the unit
    sphere's perspective silhouette, half-angle ``asin(1 / distance)``, is never clipped).
    """
    half_width = FIND3D_WINDOW_HALF_WIDTH / FIND3D_SHAPE_HALF_EXTENT
    fov = math.degrees(2.0 * math.atan(half_width / distance))
    return look_at_cameras(find3d_view_layout(n_views, distance), fov_deg=fov, image_size=image_size)
