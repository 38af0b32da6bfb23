"""``python -m patchalign segment INPUT... --parts "seat,back,leg" --model M --out DIR``

Segments users' own meshes and point clouds at full resolution, one folder per input:

``DIR/<stem>/``
    ``labels.npz``: ``names`` and, for a cloud, ``point_labels (N,)`` + ``point_scores (N, K)`` (one
    row per input point, file order); for a mesh ``vertex_labels (V,)``, ``vertex_scores``,
    ``face_labels (F,)``, ``face_scores`` (file order of vertices and faces); ``samples`` /
    ``sample_labels``: the points the model saw and its own labels of them. Written with
    ``allow_pickle=False``; ``np.load(path)`` reads it back.
    ``segmented.glb`` (meshes: faces coloured by part, the legend ``{name: "#rrggbb"}`` in the scene's
    glTF ``extras``) or ``segmented.ply`` (clouds: coloured points, the legend as header comments).
    ``parts/<name>.glb`` (meshes) or ``parts/<name>.ply`` (clouds): one file per part that got any
    face / point. ``segmented.png``: the points the model saw, coloured, with a legend.

Inputs are files or folders (searched recursively): meshes ``.glb .gltf .obj .off .stl`` (and
``.ply`` with faces), clouds ``.npy .txt .xyz .pts .pcd`` (and ``.ply`` without faces). The batch is
resumable: an input whose folder is complete is skipped (counted); folders are written to a temp
name and renamed when complete, so a killed run leaves no half folder; ``--overwrite`` recomputes.
A bad file (unreadable, empty, NaN, fewer than 32 points, unknown suffix) is a counted skip with its
reason; a run of one input that fails, or a batch where nothing succeeded, exits non-zero.

The labels come from :mod:`patchalign.segment` (the model sees 2048 points sampled as in training;
labels go back to every point, vertex and face).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchalign.atomic import atomic_path
from patchalign.io import POINT_SUFFIXES, GeometryLoadError, load_geometry, read_point_file

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".off", ".stl", ".ply")
CLOUD_SUFFIXES = tuple(s for s in POINT_SUFFIXES if s != ".ply")
INPUT_SUFFIXES = tuple(sorted(set(MESH_SUFFIXES) | set(CLOUD_SUFFIXES)))
MIN_INPUT_POINTS = 32  # one patch of the released model
DONE_FILE = "labels.npz"


class InputError(ValueError):
    """One input cannot be segmented; the message is the reason shown to the user."""


@dataclass
class SegmentSettings:
    """How each input is segmented (see :func:`patchalign.segment.segment_shape`)."""

    num_points: int = 2048
    votes: int = 1
    rotate: bool = False
    sampling: str = "random"
    seed: int = 0
    png: bool = True


@dataclass
class BatchReport:
    done: list[Path] = field(default_factory=list)
    already: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"segmented {len(self.done)}, already done {len(self.already)}, skipped {len(self.skipped)}"


def parse_parts(parts: str | Sequence[str]) -> list[str]:
    """``"seat, back,leg"`` or a list -> cleaned names (the viz tool's rule: empty or repeated names
    are refused), as an :class:`InputError`."""
    from patchalign.tools.viz import parse_part_names

    try:
        return parse_part_names(parts if isinstance(parts, str) else ",".join(parts))
    except ValueError as e:
        raise InputError(str(e)) from None


def discover_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files as given (unknown suffixes become skips) and folders' shape files, sorted, recursive."""
    found: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            hits = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES)
            if not hits:
                bad.append((p, f"folder holds no shape file ({' '.join(INPUT_SUFFIXES)})"))
            found.extend(hits)
        elif not p.exists():
            bad.append((p, "no such file or folder"))
        elif p.suffix.lower() not in INPUT_SUFFIXES:
            bad.append(
                (p, f"unknown suffix {p.suffix or '(none)'!r}; expected one of {' '.join(INPUT_SUFFIXES)}")
            )
        else:
            found.append(p)
    return found, bad


def output_names(inputs: Sequence[Path]) -> dict[Path, str]:
    """A folder name per input: the stem, or ``stem.suffix`` / parent-qualified where stems clash."""
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p in inputs:
        name = p.stem if stems[p.stem] == 1 else f"{p.stem}.{p.suffix.lstrip('.').lower()}"
        if name in used:
            name = f"{p.parent.name}__{name}"
        used.add(name)
        names[p] = name
    return names


def load_input(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(vertices (N, 3) float64, faces or None)``; raises :class:`InputError` with the reason."""
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    try:
        if suffix in CLOUD_SUFFIXES:
            verts, faces = read_point_file(path).astype(np.float64), None
        else:
            verts, faces = load_geometry(path)
    except (GeometryLoadError, ValueError, OSError, IndexError) as e:
        raise InputError(f"cannot read: {e}") from None
    if faces is not None and len(faces) == 0:
        faces = None
    if len(verts) == 0:
        raise InputError("empty: no points or vertices")
    if not np.isfinite(verts).all():
        raise InputError("NaN or inf coordinates")
    if faces is None and len(verts) < MIN_INPUT_POINTS:
        raise InputError(f"too few points: {len(verts)} < {MIN_INPUT_POINTS}")
    return verts, faces


def _hex(rgb: np.ndarray) -> str:
    r, g, b = (int(round(float(c) * 255)) for c in rgb[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "part"


def write_ply_points(path: Path, points: np.ndarray, colors: np.ndarray, comments: Sequence[str]) -> None:
    """Binary little-endian PLY with ``x y z`` float32, ``red green blue`` uchar and header comments."""
    n = len(points)
    rec = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rec["x"], rec["y"], rec["z"] = points[:, 0], points[:, 1], points[:, 2]
    rgb = np.clip(np.round(colors[:, :3] * 255), 0, 255).astype(np.uint8)
    rec["r"], rec["g"], rec["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = ["ply", "format binary_little_endian 1.0"]
    header += [f"comment {c}" for c in comments]
    header += [
        f"element vertex {n}",
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
        "end_header",
    ]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rec.tobytes())


def write_outputs(
    folder: Path,
    source: Path,
    vertices: np.ndarray,
    faces: np.ndarray | None,
    seg: Any,
    settings: SegmentSettings,
    model_name: str,
) -> None:
    """Every output file of one input into ``folder`` (which must exist and be empty)."""
    import trimesh

    from patchalign.eval.pictures import label_colors, part_palette

    names = seg.names
    k = len(names)
    palette = part_palette(max(k, 1))
    legend = {n: _hex(palette[i]) for i, n in enumerate(names)}
    meta = {
        "source": str(source),
        "model": model_name,
        "legend": legend,
        "num_points": settings.num_points,
        "votes": settings.votes,
        "rotate": settings.rotate,
        "seed": settings.seed,
    }
    arrays: dict[str, np.ndarray] = {
        "names": np.asarray(names, dtype=str),
        "samples": seg.samples.cpu().numpy().astype(np.float32),  # (votes, n, 3): what the model saw
        "sample_labels": seg.sample_labels.cpu().numpy().astype(np.int64),
    }
    parts_dir = folder / "parts"
    parts_dir.mkdir()
    if faces is None:
        labels = seg.point_labels.cpu().numpy()
        arrays["point_labels"] = labels.astype(np.int64)
        arrays["point_scores"] = seg.point_scores.cpu().numpy().astype(np.float32)
        colors = label_colors(labels, k)
        comments = [f"patchalign part {i} {n} {legend[n]}" for i, n in enumerate(names)]
        write_ply_points(folder / "segmented.ply", vertices, colors, comments)
        for i, n in enumerate(names):
            mask = labels == i
            if mask.any():
                write_ply_points(
                    parts_dir / f"{_safe_filename(n)}.ply", vertices[mask], colors[mask], comments[i : i + 1]
                )
    else:
        flabels = seg.face_labels.cpu().numpy()
        arrays["vertex_labels"] = seg.vertex_labels.cpu().numpy().astype(np.int64)
        arrays["vertex_scores"] = seg.vertex_scores.cpu().numpy().astype(np.float32)
        arrays["face_labels"] = flabels.astype(np.int64)
        arrays["face_scores"] = seg.face_scores.cpu().numpy().astype(np.float32)
        # Unmerged faces (3 vertices each): crisp part borders with per-face colours in any viewer.
        tri = vertices[faces].reshape(-1, 3)
        fcolors = (np.clip(label_colors(flabels, k), 0, 1) * 255).astype(np.uint8)
        vcolors = np.repeat(np.concatenate([fcolors, np.full((len(fcolors), 1), 255, np.uint8)], 1), 3, 0)
        flat = np.arange(len(tri)).reshape(-1, 3)
        mesh = trimesh.Trimesh(tri, flat, vertex_colors=vcolors, process=False)
        scene = trimesh.Scene(mesh)
        scene.metadata.update({"patchalign": meta})
        scene.export(folder / "segmented.glb")
        for i, n in enumerate(names):
            mask = flabels == i
            if mask.any():
                part = trimesh.Trimesh(vertices, faces[mask], process=False)
                part.remove_unreferenced_vertices()
                part.export(parts_dir / f"{_safe_filename(n)}.glb")
    (folder / "segmentation.json").write_text(json.dumps(meta, indent=2) + "\n")
    if settings.png:
        from patchalign.eval.pictures import plot_part_labels

        plot_part_labels(
            folder / "segmented.png",
            seg.samples[0].cpu().numpy(),
            seg.sample_labels[0].cpu().numpy(),
            names,
            title=source.name,
        )
    # labels.npz last: its presence marks the folder complete (the resume check).
    with atomic_path(folder / DONE_FILE) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def segment_one(
    model: Any,
    path: Path,
    text: torch.Tensor,
    names: list[str],
    out: Path,
    settings: SegmentSettings,
    model_name: str,
) -> None:
    """Segment one input into ``out`` (replaced atomically); raises :class:`InputError`."""
    from patchalign.segment import segment_shape

    vertices, faces = load_input(path)
    try:
        seg = segment_shape(
            model,
            vertices,
            text,
            faces,
            num_points=settings.num_points,
            sampling=settings.sampling,
            votes=settings.votes,
            rotate=settings.rotate,
            seed=settings.seed,
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    seg.names = names
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_outputs(tmp, path, vertices.astype(np.float32), faces, seg, settings, model_name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_segment(
    inputs: Sequence[str | os.PathLike],
    parts: str | Sequence[str],
    model: str | os.PathLike | Any,
    out: str | os.PathLike = "segmented",
    settings: SegmentSettings | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    text_encoder: str | None = None,
    progress: bool = True,
) -> BatchReport:
    """The batch behind ``python -m patchalign segment`` (also callable from Python)."""
    from tqdm import tqdm

    from patchalign.pretrained import load_pretrained

    settings = settings or SegmentSettings()
    names = parse_parts(parts)
    files, bad = discover_inputs(inputs)
    report = BatchReport(skipped=list(bad))
    if not files:  # nothing to segment: report the skips without loading a model
        return report
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        model = load_pretrained(model, device=device)
    else:
        model_name = type(model).__name__
    encoder = None
    if text_encoder is not None:
        from patchalign.text import load_text_encoder

        encoder = load_text_encoder(text_encoder)
    text = model.text_embeddings(names, encoder)
    out_root = Path(out)
    folders = output_names(files)
    bar = tqdm(files, desc="segment", unit="shape", disable=not progress, file=sys.stderr)
    for path in bar:
        dest = out_root / folders[path]
        if (dest / DONE_FILE).is_file() and not overwrite:
            report.already.append(path)
            continue
        try:
            segment_one(model, path, text, names, dest, settings, model_name)
            report.done.append(path)
        except InputError as e:
            report.skipped.append((path, str(e)))
            bar.write(f"skip {path}: {e}")
    return report


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from patchalign.argv import parse_one_line

    p = ArgumentParser(
        prog="python -m patchalign segment",
        description="Segment meshes and point clouds into named parts at full resolution.",
    )
    p.add_argument("inputs", nargs="+", help="shape files or folders (searched recursively)")
    p.add_argument(
        "--parts", type=str, required=True, help='comma-separated part names, e.g. "seat,back,leg"'
    )
    p.add_argument(
        "--model", type=str, required=True, help="export directory, Lightning .ckpt or patchalign3d.pt"
    )
    p.add_argument("--out", type=str, default="segmented", help="output folder (one sub-folder per input)")
    p.add_class_arguments(SegmentSettings, nested_key=None, as_group=True)
    p.add_argument(
        "--overwrite", action="store_true", help="recompute inputs whose output folder is complete"
    )
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument(
        "--text_encoder", type=str, default=None, help="override the text encoder recorded in the model"
    )
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--config", action=ActionConfigFile)
    cfg = parse_one_line(p, argv, "python -m patchalign segment")
    if cfg is None:
        return 2
    settings = SegmentSettings(**{f: cfg[f] for f in SegmentSettings.__dataclass_fields__})
    t0 = time.perf_counter()
    try:
        report = run_segment(
            cfg.inputs,
            cfg.parts,
            cfg.model,
            out=cfg.out,
            settings=settings,
            overwrite=cfg.overwrite,
            device=cfg.device,
            text_encoder=cfg.text_encoder,
            progress=not cfg.no_progress,
        )
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"patchalign segment: error: {e}", file=sys.stderr)
        return 2
    print(f"{report.summary()} in {time.perf_counter() - t0:.1f} s -> {cfg.out}")
    for path, reason in report.skipped:
        print(f"  skipped {path}: {reason}")
    if not report.done and not report.already:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
