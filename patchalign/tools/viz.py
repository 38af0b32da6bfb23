"""Segment a shape by part names and save its pictures: ``python -m patchalign.tools.viz``.

Uses an exported model (``python -m patchalign export``)::

    python -m patchalign.tools.viz --model exported/ --input chair.obj --parts back,seat,leg,arm --out pics/

and writes ``<out>/<input stem>_parts.png`` (points coloured by predicted part, with a legend) and
``<out>/<input stem>_pca.png`` (PCA-RGB of the patch features). The drawing itself is
:mod:`patchalign.eval.pictures` (the evaluation draws its best / worst shapes with it). Every error a
user can cause (a missing or broken model, input or text bank, bad part names, no CUDA) is one line
on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from patchalign.eval.pictures import save_shape_figures
from patchalign.geometry import normalize_unit_sphere_centroid, sample_surface
from patchalign.io import POINT_SUFFIXES, load_geometry, read_point_file


def load_points(path: str | os.PathLike, num_points: int = 2048, seed: int = 0) -> np.ndarray:
    """Points from a mesh (``.obj/.ply/.glb/.gltf/.off/.stl``, area-weighted surface samples) or a
    point file (``.npy``, ``.txt``/``.xyz`` first 3 columns, ``.pcd``, point-cloud ``.ply``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in POINT_SUFFIXES:
        try:
            return read_point_file(path)
        except ValueError as e:  # numpy's own parse errors do not name the file
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: not a point file of x y z rows ({e})") from e
    vertices, faces = load_geometry(path)  # the one mesh reader (file order, scenes merged)
    if faces is not None and len(faces) > 0:
        sample = sample_surface(torch.from_numpy(vertices), torch.from_numpy(faces), num_points, seed=seed)
        return sample.points.numpy()
    if len(vertices) == 0:
        raise ValueError(f"{path}: no points or triangles")
    return vertices.astype(np.float32)


def parse_part_names(parts: str) -> list[str]:
    """``"back, seat,leg"`` -> ``["back", "seat", "leg"]``; empty or repeated names are refused."""
    names = [n.strip() for n in parts.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--parts {parts!r} names no part: give comma-separated names, e.g. back,seat,leg")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--parts names {repeated} more than once: each part is one label")
    return names


def segment_and_draw(
    model: str,
    input: str,  # noqa: A002 - the option users type is --input
    parts: str,
    out: str = "viz",
    num_points: int = 2048,
    seed: int = 0,
    text_bank: str | None = None,
    assign: Literal["nearest", "knn", "membership"] = "nearest",
    device: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Segment one shape file by part names with an exported model and save its pictures.

    Args:
        model: directory written by ``python -m patchalign export`` (or any checkpoint it reads).
        input: mesh (.obj/.ply/.glb/.gltf/.off/.stl) or point file (.npy/.txt/.xyz/.pts/.pcd).
        parts: comma-separated part names, e.g. 'back,seat,leg,arm'.
        out: output directory for the PNGs.
        num_points: points sampled from a mesh, and the most kept from a point file.
        seed: sampling seed.
        text_bank: precomputed text bank (.safetensors) instead of the exported text encoder.
        assign: how patch labels reach the points.
        device: torch device (default: cuda if available, else cpu).
        overwrite: replace pictures of the same shape already in ``out``.

    Returns:
        The PNGs written.
    """
    names = parse_part_names(parts)
    if num_points < 1:
        raise ValueError(f"--num-points must be positive, got {num_points}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (use --device cpu)")
    if not Path(input).is_file():
        raise FileNotFoundError(f"--input {input}: no such file")
    stem = Path(out) / Path(input).stem
    earlier = [p.name for p in (Path(f"{stem}_parts.png"), Path(f"{stem}_pca.png")) if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(earlier)}: pass --overwrite to replace them")
    from patchalign.pretrained import load_pretrained

    net = load_pretrained(model, device=device)
    text = None
    if text_bank:
        from patchalign.data.textbank import load_text_bank

        text = load_text_bank(text_bank)
    pts = load_points(input, num_points, seed)
    if pts.shape[0] > num_points:
        pts = pts[np.random.default_rng(seed).choice(pts.shape[0], num_points, replace=False)]
    seg = net.segment(pts, names, text_encoder=text, assign=assign)
    enc = seg.encoding
    shown = normalize_unit_sphere_centroid(pts)  # the normalised cloud the model saw
    written = save_shape_figures(
        stem,
        shown,
        seg.labels.cpu(),
        names,
        patch_features=enc.patch_features[0].cpu(),
        point_to_patch=enc.point_to_patch[0, : shown.shape[0]].cpu(),
        title=Path(input).name,
    )
    counts = np.bincount(seg.labels.cpu().numpy().clip(min=0), minlength=len(names))
    for n, c in zip(names, counts, strict=True):
        print(f"{n:>20}: {c} points")
    for w in written:
        print(f"wrote {w}")
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m patchalign.tools.viz --model DIR --input FILE --parts a,b,c [--out DIR] ...``."""
    from patchalign.argv import run_cli

    # ValueError covers CheckpointError, GeometryLoadError and ShardFormatError; KeyError a part name
    # missing from --text-bank; ImportError a text encoder whose extra is not installed.
    errors = (ValueError, OSError, KeyError, ImportError)
    return run_cli(segment_and_draw, argv, "python -m patchalign.tools.viz", positional=False, errors=errors)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
