"""ZeroKey as the first author's code runs it: the settings of ``Wenri/Zero-Shot-3DKP`` that our
paper-based pipeline does not have, written from a reading of that code (no code copied; see
``docs/research/zerokey_original_code.md`` for every line reference).

Reproduced from ``Wenri/Zero-Shot-3DKP`` @ 116cbed583cfb686389ee5e0f08d1f9dc744bb34 (the ICCV-submission
pipeline that produced ``numbers/all.csv``):

* ``kp_utils/rendering.py`` ``sample_view_points(1, partition=3)`` -> :func:`original_view_directions`
  (8 azimuths x polar 45/90/135 from +y, then the poles, all turned 0.001 rad about +x);
* ``data_creation/backprojection.py`` ``views_from_model`` -> :func:`original_cameras` (eye = vertex
  mean + direction at distance 1 in the input frame, FoV 60, up +y);
* ``kp_utils/rendering.py`` ``HardFlatShader`` + ``PointLights`` at the camera (ambient 0.5, PyTorch3D's
  diffuse 0.3 / specular 0.2 defaults, shininess 64), grey 0.7 mesh on white -> :func:`original_shading`;
* ``kpviews.py`` 245-250 (bicubic 1024 -> 512 without antialias, x255, truncation) ->
  :func:`downsample_for_pointer`;
* ``data_creation/molmo.py`` 69-77 (the whole answer as XML) and ``kpviews.py`` 68-83 (a view whose
  answer does not parse, or gives 8 or more points, is dropped) -> :func:`parse_original_answer`;
* ``data_creation/molmo.py`` 80-110 ``draw_points`` + ``kpviews.py`` 88-123 ``backproject_kps`` ->
  :func:`lift_discs` (Gaussian discs of radius 15 px at 1024, sigma r/3, peak-normalised, summed per
  (view, name), x255 clipped to uint8, every disc pixel unprojected through the depth buffer);
* ``kpviews.py`` 152-190 ``aggregate_kps`` -> :func:`original_clusters` (``fast_hdbscan`` with
  ``sample_weight = w / mean(w)``, min_cluster_size 10 -> 5 -> 3 -> 2 until something clusters, a random
  subsample to 10 000 candidates, every cluster heavier than twice the heaviest single detection kept,
  raw-weight centroids not snapped);
* ``kp_utils/data/keypoint_labels.py`` (airplane ids 3 / 5 renamed from BT3D's table) ->
  :data:`ORIGINAL_LABEL_OVERRIDES` / :func:`original_label_table`.

Known differences that our renderer (``patchalign.render``) does not let us remove are listed in
``docs/fidelity.md`` (no back-face culling: equal on KeypointNet's double-sided meshes; PIL's ellipse
rasterisation approximated by ``d <= r``; a seeded subsample where the original's is unseeded).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from patchalign.render import Cameras, look_at_cameras
from zerokey.data import load_semantic_names

__all__ = [
    "ORIGINAL_LABEL_OVERRIDES",
    "ORIGINAL_POINT_PROMPT",
    "ORIGINAL_MAX_POINTS",
    "ORIGINAL_TILT_RAD",
    "ORIGINAL_LADDER_START",
    "original_label_table",
    "original_view_directions",
    "original_cameras",
    "ORIGINAL_PARTITIONS",
    "OriginalLight",
    "original_shading",
    "downsample_for_pointer",
    "position_colors",
    "parse_original_answer",
    "disc_weights",
    "lift_disc_maps",
    "min_cluster_size_ladder",
]

#: ``kpviews.py``:67 @116cbed: lower-case, "on this image", no full stop.
ORIGINAL_POINT_PROMPT = "point to the {name} on this image"
#: ``kpviews.py``:77 @116cbed: an answer with this many points or more drops the view.
ORIGINAL_MAX_POINTS = 8
#: ``kp_utils/rendering.py``:62 @116cbed: every view direction turned this much about +x.
ORIGINAL_TILT_RAD = 0.001
#: ``kpviews.py``:174-181 @116cbed: first min_cluster_size of the retry ladder.
ORIGINAL_LADDER_START = 10

#: ZeroKey's ``kp_utils/data/keypoint_labels.py`` @116cbed differs from BT3D's table (the source of
#: our ``semantic_names.json``) only in these labels.
ORIGINAL_LABEL_OVERRIDES: dict[str, dict[int, str]] = {
    "airplane": {
        3: "the end of the left wing of the airplane",
        5: "the end of the right wing of the airplane",
    }
}


def original_label_table(semantic_names: str | Path) -> dict[str, dict[int, str]]:
    """ZeroKey's label table: ``semantic_names.json`` (BT3D's labels) with the overrides above."""
    table = load_semantic_names(semantic_names)
    for category, labels in ORIGINAL_LABEL_OVERRIDES.items():
        if category in table:
            table[category] = table[category] | labels
    return table


# --------------------------------------------------------------------------------------------- views
def min_cluster_size_ladder(start: int = ORIGINAL_LADDER_START) -> list[int]:
    """The retry ladder: halve (rounding up) while >= 2: 10 -> 5 -> 3 -> 2."""
    out, m = [], start
    while m >= 2:
        out.append(m)
        m = math.ceil(m / 2)
    return out


def original_view_directions(tilt_rad: float = ORIGINAL_TILT_RAD, partition: int = 3) -> Tensor:
    """Unit view directions of ``sample_view_points(1, partition)``: azimuth phi in the x-z plane from
    +x towards +z (outer loop, ``2 (partition + 1)`` steps), polar theta from +y (inner loop, multiples
    of ``180 / (partition + 1)`` degrees except 0), then +y and -y; all rotated by ``tilt_rad`` about +x
    (which keeps the poles off the up axis). ``partition=3``: the 26 views (polar 45 / 90 / 135);
    ``partition=1``: the "only 6 views" ablation (4 at the equator + the poles)."""
    if partition < 1:
        raise ValueError(f"partition must be >= 1, got {partition}")
    rows = []
    for phi in np.linspace(0.0, 2.0 * np.pi, (partition + 1) * 2, endpoint=False):
        for theta in np.linspace(0.0, np.pi, partition + 1, endpoint=False)[1:]:
            rows.append([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)])
    rows += [[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]
    p = np.asarray(rows, dtype=np.float64)
    c, s = math.cos(tilt_rad), math.sin(tilt_rad)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])  # right-handed turn about +x
    return torch.from_numpy(p @ rot.T)


#: view count -> ``partition`` of the original's sampler (26: the pipeline; 6: the ablation).
ORIGINAL_PARTITIONS: dict[int, int] = {26: 3, 6: 1}


def original_cameras(
    vertices: Tensor,
    scale: float,
    distance: float = 1.0,
    fov_deg: float = 60.0,
    image_size: int = 1024,
    tilt_rad: float = ORIGINAL_TILT_RAD,
    n_views: int = 26,
) -> Cameras:
    """The original's cameras for one shape, in our normalised frame (``normalised = (input - c) / scale``).

    The original looks at the plain vertex mean from ``distance`` (input units) along each direction;
    a similarity transform of the scene leaves the images unchanged, so in the normalised frame the
    target is the normalised vertex mean and the distance is ``distance / scale``.
    """
    target = vertices.double().mean(0)
    if n_views not in ORIGINAL_PARTITIONS:
        raise ValueError(f"the original layout has {sorted(ORIGINAL_PARTITIONS)} views, got {n_views}")
    directions = original_view_directions(tilt_rad, ORIGINAL_PARTITIONS[n_views])
    eyes = target[None] + directions.to(target) * (distance / float(scale))
    cams = look_at_cameras(eyes.float(), at=target.float(), fov_deg=fov_deg, image_size=image_size)
    return cams.to(vertices.device)


@dataclass(frozen=True)
class OriginalLight:
    """The original render's material and light (PyTorch3D point light at the camera, grey mesh)."""

    grey: float = 0.7
    ambient: float = 0.5
    diffuse: float = 0.3
    specular: float = 0.2
    shininess: float = 64.0


def original_shading(
    pix_to_face: Tensor,
    vertices: Tensor,
    faces: Tensor,
    cameras: Cameras,
    light: OriginalLight = OriginalLight(),  # noqa: B008 - frozen, so one shared default is safe
    vertex_colors: Tensor | None = None,
    bary: Tensor | None = None,
) -> Tensor:
    """(V,H,W,3) image as PyTorch3D's ``HardFlatShader`` with a point light at the camera draws it.

    Flat: one colour per face, lit at its centroid: ``grey * (ambient + diffuse * cos) + specular *
    max(0, r . v) ** shininess`` with ``cos = n . l`` (``l`` = centroid -> camera = ``v``) and ``r`` the
    light reflected about ``n``. The original culls back faces; our renderer does not, so the normal is
    turned towards the camera (``|cos|``), which is what culling gives on double-sided meshes.
    Background white.
    """
    tri = vertices[faces].double()
    centroid = tri.mean(1)  # (F,3)
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    eye = cameras.centers.double()  # (V,3)
    mask = pix_to_face >= 0
    face = pix_to_face.clamp_min(0)
    view_ids = torch.arange(pix_to_face.shape[0], device=pix_to_face.device)[:, None, None].expand_as(face)
    to_eye = eye[view_ids] - centroid[face]
    to_eye = to_eye / to_eye.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    n = normal[face]
    cos = (n * to_eye).sum(-1)
    n = torch.where(cos[..., None] < 0, -n, n)
    cos = cos.abs()
    reflect = -to_eye + 2.0 * cos[..., None] * n
    spec = (reflect * to_eye).sum(-1).clamp_min(0.0) ** light.shininess
    diffuse = light.ambient + light.diffuse * cos
    if vertex_colors is None:
        value = light.grey * diffuse + light.specular * spec
        image = torch.where(mask, value, torch.ones_like(value)).float()
        return image.unsqueeze(-1).expand(*image.shape, 3).contiguous()
    if bary is None:
        raise ValueError("vertex colours need the render's barycentrics")
    corners = vertex_colors.to(tri)[faces[face]]  # (V,H,W,3 corners,3 rgb)
    texel = (bary.to(tri)[..., None] * corners).sum(-2)
    value = texel * diffuse[..., None] + (light.specular * spec)[..., None]
    return torch.where(mask[..., None], value, torch.ones_like(value)).float()


def position_colors(vertices: Tensor) -> Tensor:
    """(N,3) vertex colours of the authors' position-map render: xyz min-max normalised per axis to
    [0, 1] (``kp_utils/data/utils.py`` ``load_mesh`` @116cbed; the same in any frame that only shifts and
    scales the shape)."""
    lo, hi = vertices.amin(0), vertices.amax(0)
    return (vertices - lo) / (hi - lo).clamp_min(1e-12)


def downsample_for_pointer(image: Tensor, size: int) -> Tensor:
    """(H,W,3) float render -> (size,size,3) float whose values are uint8 levels / 255: bicubic without
    antialias (``align_corners=False``), then x255, clip and truncate, as the original hands Molmo its
    512 px views (an encoder rounding ``x * 255 + 0.5`` then reproduces those integers)."""
    x = image.permute(2, 0, 1)[None].float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    levels = torch.floor((x * 255.0).clamp(0.0, 255.0))
    return (levels / 255.0)[0].permute(1, 2, 0).contiguous()


# ------------------------------------------------------------------------------------------- parsing
def parse_original_answer(text: str | None, max_points: int | None = ORIGINAL_MAX_POINTS):
    """Points of one answer parsed as the original does: the whole answer as one XML element whose
    ``x*`` / ``y*`` attributes are the coordinates (``<point x= y=>``, ``<points x1= y1= ...>``).

    Returns ``(points, reason)``: ``points`` is a list of (x, y) percent pairs, or None when the view is
    dropped, with ``reason`` one of ``"xml_error"`` (not XML: prose, "There are none.", two tags),
    ``"malformed"`` (a coordinate that is not a number, an x without its y -- the original would stop
    there with an exception) or ``"too_many_points"`` (``>= max_points``). Coordinates are not range
    checked, as in the original (a disc outside the image is clipped by the canvas).
    """
    if text is None:
        return None, "xml_error"
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return None, "xml_error"
    coords: dict[str, dict[str, float]] = {}
    for key, value in root.attrib.items():
        if key[:1] in ("x", "y"):
            try:
                coords.setdefault(key[1:], {})[key[0]] = float(value)
            except ValueError:
                return None, "malformed"
    if any(len(c) != 2 for c in coords.values()):
        return None, "malformed"
    points = [(c["x"], c["y"]) for c in coords.values()]
    if max_points is not None and len(points) >= max_points:
        return None, "too_many_points"
    return points, None


# ------------------------------------------------------------------------------------------- lifting
def disc_weights(center: tuple[float, float], radius: float = 15.0) -> dict[tuple[int, int], float]:
    """One disc's weights by pixel index ``(col, row)``: ``exp(-d^2 / (2 sigma^2))`` with sigma = r/3 and
    ``d`` from the integer pixel index to the centre, over the pixels with ``d <= r``, divided by its
    largest value (the pixel nearest the centre gets 1). A plain reference for the tests and docs; the
    pipeline uses the vectorised :func:`lift_disc_maps`."""
    cx, cy = center
    sigma = radius / 3.0
    out: dict[tuple[int, int], float] = {}
    for col in range(math.floor(cx - radius), math.ceil(cx + radius) + 1):
        for row in range(math.floor(cy - radius), math.ceil(cy + radius) + 1):
            d2 = (col - cx) ** 2 + (row - cy) ** 2
            if d2 <= radius * radius:
                out[(col, row)] = math.exp(-0.5 * d2 / sigma**2)
    peak = max(out.values(), default=1.0)
    return {k: v / peak for k, v in out.items()}


def lift_disc_maps(
    uv: Tensor,
    view: Tensor,
    name_index: Tensor,
    image_size: int,
    radius: float = 15.0,
    quantize: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per (view, name) weight maps of the detections' discs, as flat pixel lists.

    ``uv`` are the detections in the render's pixels with the original's centring (Molmo's percent x
    times the image size, compared with integer pixel indices). Discs of one (view, name) are summed;
    with ``quantize`` the sum becomes ``floor(clip(255 * sum, 0, 255))`` (the uint8 alpha). Each pixel
    belongs to the last detection drawn over it (the highest row of ``uv`` covering it).

    Returns ``(view, name, col, row, weight, detection)`` of every in-image pixel with weight > 0.
    """
    device = uv.device
    n = uv.shape[0]
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    if n == 0:
        return empty_long, empty_long, empty_long, empty_long, torch.zeros(0, device=device), empty_long
    span = int(math.ceil(radius)) + 1
    steps = torch.arange(-span, span + 1, device=device)
    oy, ox = torch.meshgrid(steps, steps, indexing="ij")
    base = torch.floor(uv.double()).long()  # (P,2)
    col = base[:, None, 0] + ox.reshape(1, -1)
    row = base[:, None, 1] + oy.reshape(1, -1)
    d2 = (col.double() - uv[:, None, 0].double()) ** 2 + (row.double() - uv[:, None, 1].double()) ** 2
    inside = d2 <= radius * radius
    sigma = radius / 3.0
    g = torch.exp(-0.5 * d2 / sigma**2)
    peak = torch.where(inside, g, torch.zeros_like(g)).amax(1, keepdim=True).clamp_min(1e-300)
    g = g / peak
    det = torch.arange(n, device=device)[:, None].expand_as(col)
    keep = inside & (col >= 0) & (col < image_size) & (row >= 0) & (row < image_size)
    col, row, g, det = col[keep], row[keep], g[keep], det[keep]
    v, k = view.to(device)[det], name_index.to(device)[det]
    n_names = int(name_index.max()) + 1
    key = ((v * n_names + k) * image_size + row) * image_size + col
    unique, inverse = torch.unique(key, return_inverse=True)
    total = torch.zeros(unique.shape[0], dtype=torch.float64, device=device).index_add_(0, inverse, g)
    owner = torch.full((unique.shape[0],), -1, dtype=torch.long, device=device)
    owner = owner.scatter_reduce(0, inverse, det, reduce="amax", include_self=True)
    weight = torch.floor((total * 255.0).clamp(0.0, 255.0)) if quantize else total
    positive = weight > 0
    unique, weight, owner = unique[positive], weight[positive], owner[positive]
    out_col = unique % image_size
    out_row = (unique // image_size) % image_size
    group = unique // (image_size * image_size)
    return group // n_names, group % n_names, out_col, out_row, weight.float(), owner
