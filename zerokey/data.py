"""Shapes for ZeroKey: meshes or point clouds, normalised to the unit sphere, plus KeypointNet readers.

Every shape is normalised (bounding-box centre to the origin, farthest point at radius 1) because the
camera layout assumes a unit-sphere object. The transform is kept on the sample so predicted keypoints
are written back in the *input* frame -- which is the frame KeypointNet's annotations and point clouds
live in, so evaluation needs no extra bookkeeping.

A file that cannot be read does not abort a prediction run over thousands of shapes: the dataset
returns a sample whose ``error`` says why; the Lightning module writes that into the shape's JSON and
counts it.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from patchalign.geometry import normalize_unit_sphere_bbox
from patchalign.io import POINT_SUFFIXES, load_geometry, read_point_file

__all__ = [
    "KEYPOINTNET_CLASSES",
    "ShapeSample",
    "read_pcd",
    "load_mesh_file",
    "load_shape",
    "FileShapeDataset",
    "KeypointNetDataset",
    "load_keypointnet_annotations",
    "load_semantic_names",
    "collate_shapes",
]

log = logging.getLogger(__name__)

#: KeypointNet / ShapeNet synset ids of the 16 KeypointNet categories (as in its benchmark scripts).
KEYPOINTNET_CLASSES: dict[str, str] = {
    "02691156": "airplane",
    "02808440": "bathtub",
    "02818832": "bed",
    "02876657": "bottle",
    "02954340": "cap",
    "02958343": "car",
    "03001627": "chair",
    "03467517": "guitar",
    "03513137": "helmet",
    "03624134": "knife",
    "03642806": "laptop",
    "03790512": "motorcycle",
    "03797390": "mug",
    "04225987": "skateboard",
    "04379243": "table",
    "04530566": "vessel",
}
_NAME_TO_CLASS = {v: k for k, v in KEYPOINTNET_CLASSES.items()}

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".off", ".stl")
# point clouds: every suffix the project's point reader takes (patchalign.io.POINT_SUFFIXES: .txt too)


@dataclass
class ShapeSample:
    """One shape ready for rendering, in normalised coordinates.

    Attributes:
        shape_id: unique id, used as the output file name (``class_id/model_id`` for KeypointNet).
        source: path of the rendered file.
        vertices: (N,3) float32 normalised mesh vertices, or the points of a point cloud.
        faces: (F,3) long mesh faces; None for a point cloud.
        center, scale: ``normalised = (original - center) / scale``.
        category: category name ("chair") if known; class_id / model_id: KeypointNet ids if known.
        names: keypoint names given with the data (config / dataset), or None.
        keypoints: (K,3) normalised ground-truth keypoints if known (evaluation / OraclePointer).
        keypoint_names: K names of those keypoints (None entries allowed).
        error: why the shape could not be loaded (then geometry is empty and it is skipped, counted).
    """

    shape_id: str
    source: str
    vertices: Tensor
    faces: Tensor | None
    center: Tensor
    scale: float
    category: str | None = None
    class_id: str | None = None
    model_id: str | None = None
    names: list[str] | None = None
    keypoints: Tensor | None = None
    keypoint_names: list[str | None] | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_mesh(self) -> bool:
        return self.faces is not None

    def to_original(self, xyz: Tensor) -> Tensor:
        """Normalised coordinates -> the input file's frame."""
        return xyz * self.scale + self.center.to(xyz)

    def to_normalised(self, xyz: Tensor) -> Tensor:
        return (xyz - self.center.to(xyz)) / self.scale

    def to(self, device: torch.device | str) -> ShapeSample:
        """A copy with tensors on ``device``."""
        return ShapeSample(
            shape_id=self.shape_id,
            source=self.source,
            vertices=self.vertices.to(device),
            faces=None if self.faces is None else self.faces.to(device),
            center=self.center.to(device),
            scale=self.scale,
            category=self.category,
            class_id=self.class_id,
            model_id=self.model_id,
            names=self.names,
            keypoints=None if self.keypoints is None else self.keypoints.to(device),
            keypoint_names=self.keypoint_names,
            error=self.error,
            extra=self.extra,
        )


def collate_shapes(batch: list[ShapeSample]) -> list[ShapeSample]:
    """Shapes differ in size: a batch is just the list (the module loops over shapes; all per-shape
    work inside is batched over views / points)."""
    return list(batch)


# ------------------------------------------------------------------------------------------- readers
def read_pcd(path: str | Path) -> tuple[np.ndarray, None]:
    """(N,3) float32 ``x y z`` of a PCD file and None (kept as a pair for callers that unpack it).

    The project's one PCD reader (:func:`patchalign.io.read_point_file`: ASCII and binary PCD,
    empty and non-finite files refused). Colours are not read: nothing in ZeroKey uses them.
    """
    return read_point_file(path), None


def load_mesh_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a mesh (.obj/.ply/.glb/...) through :func:`patchalign.io.load_geometry` (the one mesh
    reader: scenes merged with their transforms applied, file order kept).

    Returns (N,3) float32 vertices and (F,3) int64 faces; faces is None when the file is a point cloud
    (e.g. a .ply without faces). Empty geometry is a clear error.
    """
    vertices, faces = load_geometry(path)
    if len(vertices) == 0:
        raise ValueError(f"{path}: empty geometry (no vertices)")
    if faces is not None and len(faces) == 0:
        raise ValueError(f"{path}: empty mesh ({len(vertices)} vertices, 0 faces)")
    return vertices.astype(np.float32), faces


def load_shape(
    path: str | Path,
    shape_id: str | None = None,
    category: str | None = None,
    names: list[str] | None = None,
) -> ShapeSample:
    """Load a mesh or point-cloud file and normalise it about its bounding-box centre
    (:func:`patchalign.geometry.normalize_unit_sphere_bbox`, the renderer's convention)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in POINT_SUFFIXES:
        xyz, faces = read_point_file(path), None
    elif suffix in MESH_SUFFIXES:
        xyz, faces = load_mesh_file(path)
    else:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r} (meshes {MESH_SUFFIXES}, points {POINT_SUFFIXES})"
        )
    faces_t = None if faces is None else torch.from_numpy(faces).long()
    vertices, transform = normalize_unit_sphere_bbox(torch.from_numpy(np.ascontiguousarray(xyz)), faces_t)
    return ShapeSample(
        shape_id=shape_id or path.stem,
        source=str(path),
        vertices=vertices.float(),
        faces=faces_t,
        center=transform.centre.float(),
        scale=transform.scale,
        category=category,
        names=names,
    )


def _failed_sample(shape_id: str, source: str, error: str, **kwargs) -> ShapeSample:
    log.warning("skipping shape %s: %s", shape_id, error)
    return ShapeSample(
        shape_id=shape_id,
        source=source,
        vertices=torch.zeros(0, 3),
        faces=None,
        center=torch.zeros(3),
        scale=1.0,
        error=error,
        **kwargs,
    )


class FileShapeDataset(Dataset):
    """Shapes from files: ``inputs`` are files, directories (searched recursively for supported
    suffixes) or glob patterns. ``category`` / ``names`` apply to every shape (e.g. a folder of chairs).

    Raises at construction when nothing matches (a typo in a path should not produce an empty run).
    """

    def __init__(self, inputs: Sequence[str], category: str | None = None, names: list[str] | None = None):
        suffixes = MESH_SUFFIXES + POINT_SUFFIXES
        paths: list[Path] = []
        missing: list[str] = []
        for item in [inputs] if isinstance(inputs, str) else inputs:
            p = Path(item)
            if p.is_dir():
                paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in suffixes)
            elif p.is_file():
                paths.append(p)
            else:
                matched = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
                matched = [m for m in matched if m.is_file()]
                if not matched:
                    missing.append(str(item))
                paths += matched
        if missing:
            raise FileNotFoundError(f"no shape files found for: {', '.join(missing)}")
        if not paths:
            raise FileNotFoundError(f"no files with suffix {suffixes} under {list(inputs)}")
        self.paths = paths
        self.category = category
        self.names = names
        # Files with the same stem in different folders would overwrite each other's output.
        stems = [p.stem for p in paths]
        self.ids = [p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}_{p.stem}" for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ShapeSample:
        path = self.paths[index]
        try:
            return load_shape(path, self.ids[index], self.category, self.names)
        except (ValueError, OSError, IndexError) as err:
            return _failed_sample(
                self.ids[index], str(path), f"{type(err).__name__}: {err}", category=self.category
            )


# -------------------------------------------------------------------------------------- KeypointNet
def load_keypointnet_annotations(paths: Sequence[str | Path]) -> dict[tuple[str, str], dict]:
    """Read KeypointNet annotation JSON files -> {(class_id, model_id): annotation}."""
    out: dict[tuple[str, str], dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of KeypointNet annotations")
        for entry in entries:
            try:
                out[(str(entry["class_id"]), str(entry["model_id"]))] = entry
            except (KeyError, TypeError) as err:
                raise ValueError(f"{path}: annotation without class_id/model_id: {str(entry)[:120]}") from err
    return out


def load_semantic_names(path: str | Path) -> dict[str, dict[int, str]]:
    """``semantic_names.json`` -> {category: {semantic_id: name}}."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    categories = data.get("categories", data)
    return {
        cat: {int(k): v["name"] if isinstance(v, dict) else str(v) for k, v in ids.items()}
        for cat, ids in categories.items()
    }


class KeypointNetDataset(Dataset):
    """KeypointNet shapes with their annotated keypoints.

    Layout (relative to ``root``; patterns use ``{class_id}`` / ``{model_id}``)::

        annotations/<category>.json      KeypointNet annotation lists
        pcds/<class_id>/<model_id>.pcd   the 2048-point clouds the keypoints index into
        meshes/<class_id>/<model_id>.ply ShapeNetCore.v2 model_normalized meshes (optional)
        semantic_names.json              a text name per (category, semantic_id) (optional)
        splits/<split>.txt               lines "<class_id>-<model_id>" (optional)

    Args:
        root: dataset root.
        categories: category names or class ids to keep (None: all annotation files).
        split: keep only models listed in ``splits/<split>.txt``.
        model_ids: keep only these model ids.
        use_mesh: render the mesh when one exists (else / otherwise the point cloud).
        limit: at most this many shapes (after sorting), for quick runs.

    Annotated models without a point cloud on disk are skipped and counted in ``self.skipped``
    (a full annotation file lists ~1000 models per category; a local copy may hold a few).
    Keypoints and mesh share ShapeNet's normalised frame with the pcd, so the same transform maps all.
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str] | None = None,
        split: str | None = None,
        model_ids: Sequence[str] | None = None,
        use_mesh: bool = True,
        annotation_files: Sequence[str] | None = None,
        pcd_pattern: str = "pcds/{class_id}/{model_id}.pcd",
        mesh_pattern: str = "meshes/{class_id}/{model_id}.ply",
        semantic_names: str | None = "semantic_names.json",
        limit: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"KeypointNet root {self.root} does not exist")
        files = (
            [Path(f) for f in annotation_files]
            if annotation_files
            else sorted((self.root / "annotations").glob("*.json"))
        )
        files = [f if f.is_absolute() else (self.root / f if not f.exists() else f) for f in files]
        wanted = None
        if categories:
            wanted = {_NAME_TO_CLASS.get(c, c) for c in categories}
            unknown = [c for c in wanted if c not in KEYPOINTNET_CLASSES]
            if unknown:
                raise ValueError(f"unknown KeypointNet categories {unknown}; known: {sorted(_NAME_TO_CLASS)}")
            files = [f for f in files if _NAME_TO_CLASS.get(f.stem, f.stem) in wanted or f.stem == "all"]
        if not files:
            raise FileNotFoundError(f"no annotation files under {self.root / 'annotations'} for {categories}")
        self.annotations = load_keypointnet_annotations(files)
        names_path = self.root / semantic_names if semantic_names else None
        self.semantic_names = load_semantic_names(names_path) if names_path and names_path.exists() else {}
        split_ids = None
        if split is not None:
            split_file = self.root / "splits" / f"{split}.txt"
            if not split_file.exists():
                raise FileNotFoundError(f"split file {split_file} not found")
            split_ids = {
                line.strip().split("-")[-1] for line in split_file.read_text().splitlines() if line.strip()
            }
        self.pcd_pattern, self.mesh_pattern, self.use_mesh = pcd_pattern, mesh_pattern, use_mesh
        self.skipped: dict[str, int] = {
            "no_pcd": 0,
            "not_in_split": 0,
            "other_category": 0,
            "not_requested": 0,
        }
        keys = []
        for class_id, model_id in sorted(self.annotations):
            if wanted is not None and class_id not in wanted:
                self.skipped["other_category"] += 1
            elif model_ids is not None and model_id not in set(model_ids):
                self.skipped["not_requested"] += 1
            elif split_ids is not None and model_id not in split_ids:
                self.skipped["not_in_split"] += 1
            elif not (self.root / pcd_pattern.format(class_id=class_id, model_id=model_id)).exists():
                self.skipped["no_pcd"] += 1
            else:
                keys.append((class_id, model_id))
        if limit is not None:
            keys = keys[:limit]
        self.keys = keys
        if self.skipped["no_pcd"]:
            log.info(
                "KeypointNet: %d annotated shapes have no point cloud under %s; skipped",
                self.skipped["no_pcd"],
                self.root,
            )
        if not self.keys:
            raise FileNotFoundError(
                f"no KeypointNet shapes with point clouds under {self.root} (skipped: {self.skipped})"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def category_names(self, class_id: str) -> dict[int, str]:
        return self.semantic_names.get(KEYPOINTNET_CLASSES.get(class_id, class_id), {})

    def pcd_path(self, class_id: str, model_id: str) -> Path:
        return self.root / self.pcd_pattern.format(class_id=class_id, model_id=model_id)

    def __getitem__(self, index: int) -> ShapeSample:
        class_id, model_id = self.keys[index]
        shape_id = f"{class_id}/{model_id}"
        category = KEYPOINTNET_CLASSES.get(class_id)
        pcd_path = self.pcd_path(class_id, model_id)
        mesh_path = self.root / self.mesh_pattern.format(class_id=class_id, model_id=model_id)
        source = mesh_path if self.use_mesh and mesh_path.exists() else pcd_path
        meta = {"category": category, "class_id": class_id, "model_id": model_id}
        try:
            sample = load_shape(source, shape_id=shape_id, category=category)
        except (ValueError, OSError, IndexError) as err:
            return _failed_sample(shape_id, str(source), f"{type(err).__name__}: {err}", **meta)
        annotation = self.annotations[(class_id, model_id)]
        names = self.category_names(class_id)
        kps = annotation.get("keypoints", [])
        xyz = torch.tensor([kp["xyz"] for kp in kps], dtype=torch.float32).reshape(-1, 3)
        sample.class_id, sample.model_id = class_id, model_id
        sample.keypoints = sample.to_normalised(xyz)
        sample.keypoint_names = [names.get(int(kp.get("semantic_id", -1))) for kp in kps]
        sample.extra = {
            "pcd_path": str(pcd_path),
            "semantic_ids": [int(kp.get("semantic_id", -1)) for kp in kps],
            "pcd_indices": [int(kp.get("pcd_info", {}).get("point_index", -1)) for kp in kps],
        }
        return sample
