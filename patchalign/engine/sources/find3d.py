"""Reader for the output of Find3D's data engine (ziqi-ma/Find3D, ``dataengine/``, commit 44e6d65).

On-disk layout under ``DATA_ROOT/labeled`` (read from their scripts, not from documentation):

``points/<uid>/`` -- written by their point sampling step (customised PyTorch3D
``sample_points_from_meshes`` that also returns face ids):

* ``points.pt``      ``(N, 3)`` float, N = 5000, in their mesh frame (``glb_to_py3d``: centred on the
  vertex mean, scaled into a 0.75 half-size box, then rotated 180 deg about y -> y up);
* ``point2face.pt``  ``(N,)`` long, the face each point was sampled from;
* ``normals.pt``, ``rgb.pt`` ``(N, 3)`` (not needed here).

``rendered/<class>_<uid>/oriented/`` -- ``dataengine/rendering/render_2d.py`` and later steps:

* ``pix2face.pt``    ``(V, H, W)`` face index per pixel, ``-1`` background (V = 10, 500 px). Their
  ``get_face_pixel_correspondence`` adds ``-1.0 * mask`` so the tensor is usually float; we round;
* ``imgs/{i:02d}.jpeg`` the V rendered views (Phong-shaded, textured);
* ``masks/merged/`` -- ``seg2d/merge_masks.py`` + ``label3d/label_mask2pt.py``:

  - ``mask_labels.txt``  one part name per line, M lines; a name appears once *per view* (masks
    with the same name in one view were OR-ed); names containing ``"unknown"`` were dropped;
  - ``mask2points.pt``   ``(M, N)`` 0/1 (int64): which points fall in each mask;
  - ``allmasks.pt`` ``(M, H, W)`` and ``mask2view.pt`` ``(M,)`` (2D masks, not needed here).

``split/{train,val}.txt`` -- ``data_process/train_test_split.py``: one ``<class>_<uid>`` per line.
``<class>`` may itself contain underscores; the uid is the part after the last one (as they do).

:func:`membership_from_masks` turns ``mask2points`` + labels into our per-point multi-label
membership: masks sharing a (cleaned) name are OR-ed across views, and any name containing
"unknown" is dropped (their own filter, applied again defensively).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from patchalign.engine.sources import ObjectSource
from patchalign.geometry import normalize_unit_sphere_bbox
from patchalign.text import clean_part_name

__all__ = [
    "Find3DObject",
    "Find3DSource",
    "discover_find3d_objects",
    "find3d_records",
    "load_find3d_labels",
    "load_find3d_points",
    "load_find3d_views",
    "membership_from_masks",
]


@dataclass
class Find3DObject:
    """Paths of one object in a Find3D data root."""

    uid: str
    category: str
    points_dir: Path
    rendered_dir: Path  # .../rendered/<class>_<uid>/oriented
    split: str = "train"

    @property
    def masks_dir(self) -> Path:
        return self.rendered_dir / "masks" / "merged"


def _torch_load(path: Path) -> Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"Find3D file {path} is missing")
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, Tensor):
        t = torch.as_tensor(np.asarray(t))
    return t


def split_name_uid(name_uid: str) -> tuple[str, str]:
    """``"office_chair_8f3a..."`` -> ``("office_chair", "8f3a...")`` (uid after the last underscore)."""
    if "_" not in name_uid:
        return "", name_uid
    category, _, uid = name_uid.rpartition("_")
    return category, uid


def discover_find3d_objects(root: str | os.PathLike, view_set: str = "oriented") -> list[Find3DObject]:
    """All objects of a Find3D data root (the directory holding ``points/`` and ``rendered/``).

    Split membership comes from ``split/train.txt`` / ``split/val.txt`` when present (objects in
    neither are ``"train"``). A ``labeled/`` level is entered automatically if ``root`` is DATA_ROOT.
    """
    root = Path(root)
    if (root / "labeled").is_dir() and not (root / "rendered").is_dir():
        root = root / "labeled"
    rendered = root / "rendered"
    if not rendered.is_dir():
        raise FileNotFoundError(f"{root} is not a Find3D data root (no rendered/ directory)")
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        f = root / "split" / f"{split}.txt"
        if f.is_file():
            for line in f.read_text().splitlines():
                if line.strip():
                    split_of[line.strip()] = split
    objects = []
    for d in sorted(p for p in rendered.iterdir() if p.is_dir()):
        category, uid = split_name_uid(d.name)
        objects.append(
            Find3DObject(
                uid=uid,
                category=category.replace("_", " "),
                points_dir=root / "points" / uid,
                rendered_dir=d / view_set,
                split=split_of.get(d.name, "train"),
            )
        )
    return objects


def load_find3d_points(obj: Find3DObject) -> tuple[Tensor, Tensor]:
    """``points (N,3)`` float32 and ``face_ids (N,)`` long of one object."""
    points = _torch_load(obj.points_dir / "points.pt").to(torch.float32).reshape(-1, 3)
    face_ids = _torch_load(obj.points_dir / "point2face.pt").reshape(-1).round().to(torch.long)
    if face_ids.shape[0] != points.shape[0]:
        raise ValueError(f"{obj.uid}: {points.shape[0]} points but {face_ids.shape[0]} point2face entries")
    return points, face_ids


def load_find3d_views(obj: Find3DObject) -> tuple[Tensor, Tensor]:
    """Rendered views ``(V,H,W,3)`` uint8 and ``pix_to_face (V,H,W)`` long of one object."""
    from PIL import Image

    pix_to_face = _torch_load(obj.rendered_dir / "pix2face.pt")
    pix_to_face = (
        pix_to_face.round().to(torch.long) if pix_to_face.is_floating_point() else pix_to_face.long()
    )
    if pix_to_face.ndim != 3:
        raise ValueError(f"{obj.uid}: pix2face must be (V,H,W), got {tuple(pix_to_face.shape)}")
    n_views, height, width = pix_to_face.shape
    images = []
    for i in range(n_views):
        path = obj.rendered_dir / "imgs" / f"{i:02d}.jpeg"
        if not path.is_file():
            raise FileNotFoundError(f"Find3D view {path} is missing")
        im = np.asarray(Image.open(path).convert("RGB"))
        if im.shape[:2] != (height, width):
            raise ValueError(f"{path}: image {im.shape[:2]} does not match pix2face {(height, width)}")
        images.append(torch.from_numpy(im.copy()))
    return torch.stack(images), pix_to_face


def membership_from_masks(mask2points: Tensor, labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Per-point multi-label membership from Find3D masks.

    Args:
        mask2points: ``(M, N)`` 0/1 (any dtype): mask m covers point n.
        labels: ``M`` part names, one per mask.

    Returns:
        ``membership (N, L)`` bool and ``L`` unique cleaned names in first-occurrence order; masks
        with the same cleaned name are OR-ed; names containing "unknown" (and empty names) dropped.
    """
    if mask2points.ndim != 2 or mask2points.shape[0] != len(labels):
        raise ValueError(f"mask2points {tuple(mask2points.shape)} does not match {len(labels)} mask labels")
    names = [clean_part_name(s) for s in labels]
    keep_names = list(dict.fromkeys(n for n in names if n and "unknown" not in n))
    n_points = mask2points.shape[1]
    if not keep_names:
        return np.zeros((n_points, 0), dtype=bool), []
    column = {n: i for i, n in enumerate(keep_names)}
    mask_col = torch.tensor([column.get(n, -1) for n in names], dtype=torch.long)
    keep = mask_col >= 0
    masks = (mask2points[keep] > 0).to(torch.float32)  # (M', N)
    # OR over masks of the same name = (one-hot(name) @ masks) > 0, in one matmul.
    onehot = torch.zeros(len(keep_names), masks.shape[0])
    onehot[mask_col[keep], torch.arange(masks.shape[0])] = 1.0
    membership = (onehot @ masks) > 0  # (L, N)
    return membership.T.contiguous().numpy(), keep_names


def load_find3d_labels(obj: Find3DObject) -> tuple[np.ndarray, list[str]]:
    """Membership ``(N, L)`` and names of one object from ``masks/merged/``; ``(N, 0)`` if it has none."""
    labels_path = obj.masks_dir / "mask_labels.txt"
    if not labels_path.is_file():
        raise FileNotFoundError(f"{obj.uid}: {labels_path} is missing (object not labelled by Find3D)")
    labels = labels_path.read_text().splitlines()
    mask2points = _torch_load(obj.masks_dir / "mask2points.pt")
    if mask2points.ndim == 1:  # a single mask saved without its leading dimension
        mask2points = mask2points[None]
    return membership_from_masks(mask2points, labels)


def find3d_records(root: str | os.PathLike) -> list[Any]:
    """Data-engine records (``source="find3d"``) for every object of a Find3D data root."""
    from patchalign.engine.records import ObjectRecord

    return [
        ObjectRecord(
            uid=o.uid,
            source="find3d",
            path=str(o.rendered_dir),
            category=o.category,
            split=o.split,
            extra={"points_dir": str(o.points_dir)},
        )
        for o in discover_find3d_objects(root)
    ]


class Find3DSource(ObjectSource):
    """The data-engine plug-in of ``source == "find3d"`` records: Find3D's own points, renders and
    merged-mask labels (no mesh). Points are re-normalised to our unit sphere (bounding-box centre)
    unless ``frame == "raw"`` (released: Find3D's frame, untouched)."""

    kind = "find3d"

    @staticmethod
    def object_of(record: Any) -> Find3DObject:
        return Find3DObject(
            uid=record.uid,
            category=record.category,
            points_dir=Path(record.extra["points_dir"]),
            rendered_dir=Path(record.path),
            split=record.split,
        )

    def points(self, record: Any, frame: str) -> dict[str, Any]:
        points, face_ids = load_find3d_points(self.object_of(record))
        if frame == "raw":
            pts = points.to(torch.float32)
            norm: dict[str, Any] = {"centre": [0.0, 0.0, 0.0], "scale": 1.0, "frame": "find3d-raw"}
        else:  # Find3D points live in a 0.75 half-box around the vertex mean: bring them to ours
            pts64, (centre, scale) = normalize_unit_sphere_bbox(points.to(torch.float64))
            pts = pts64.to(torch.float32)
            norm = {"centre": centre.tolist(), "scale": scale, "frame": "find3d"}
        return dict(points=pts.numpy(), face_ids=face_ids.numpy(), normalization=json.dumps(norm))

    def views(self, record: Any) -> tuple[Tensor, Tensor]:
        return load_find3d_views(self.object_of(record))

    def labels(self, record: Any, face_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
        membership, names = load_find3d_labels(self.object_of(record))
        if membership.shape[0] != face_ids.shape[0]:
            raise ValueError(
                f"{record.uid}: masks cover {membership.shape[0]} points, the object has {face_ids.shape[0]}"
            )
        return membership, names
