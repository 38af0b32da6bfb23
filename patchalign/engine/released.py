"""Shards from PatchAlign3D's released training data, reusing its DINOv2 patch targets as stored.

Reproduces the data side of PatchAlign3D's released Stage 1 (arXiv 2601.02457; dickoah/PatchAlign3D:
``patchalign3d/datasets/trainset.py``, ``patchalign3d/tools/precompute_dino_patch_features.py``,
``patchalign3d/training/stage1.py``; read from a public copy of those files, the stored repository
snapshot has none of them at a commit) so no DINOv2 forward is recomputed. Layout under
``DATA_ROOT/labeled`` (the Find3D data engine's, ziqi-ma/Find3D @ 44e6d65, see
:mod:`patchalign.engine.sources.find3d`)::

    points/<uid>/points.pt                                     (N, 3) float, Find3D mesh frame (y up)
    rendered/<class>_<uid>/oriented/masks/merged/mask2points.pt (M, N) 0/1
    rendered/<class>_<uid>/oriented/masks/merged/mask_labels.txt M part names
    rendered/<class>_<uid>/oriented/patch_dino/patch_features.pt  dict, written by torch.save:
        item_id str, feature_dim int, img_size int,
        centers_idx (G,) long      FPS (seed 0) over all N points,
        centers_xyz (G, 3) float32 = points[centers_idx] **after swapping y and z**,
        patch_idx (G, M) long      the M = 32 nearest points of each centre,
        point2center (N,) long,
        patch_feats (G, D) float16 mean of the patch's per-point DINOv2 features, L2-normalised
    split/{train,val}.txt                                        one <class>_<uid> per line

Frames: the released code swaps y and z of every point before the encoder (``prepare_points``) and
stores the centres in that swapped frame; the nearest-centre matching compares the two there. The
default ``frame="released"`` keeps that (points swapped, ``up_axis="z"``); ``frame="find3d"`` keeps
the Find3D frame (points as stored, centres swapped back, ``up_axis="y"``). Neither re-normalises:
the coordinates stay in Find3D's 0.75 half-size box as the released training saw them.

Every object's centres are checked against its points (``points[centers_idx]`` in the chosen frame)
so a file from another frame or another point sampling is refused, not silently mis-matched.
Objects with missing files are skipped, counted and printed; nothing converted is an error.

``python -m patchalign.engine.released DATA_ROOT OUT_DIR [--split train] [--frame released]``
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from torch import Tensor

from patchalign.data.schema import MIN_POINTS, ObjectSample, ShardFormatError
from patchalign.data.writer import ShardSetWriter
from patchalign.engine.cli import normalize_argv, one_line
from patchalign.engine.sources.find3d import Find3DObject, discover_find3d_objects, load_find3d_labels

log = logging.getLogger(__name__)

Frame = Literal["released", "find3d"]
PATCH_FILE = "patch_features.pt"
CENTRE_TOLERANCE = 1e-5
"""Largest allowed ``|centers_xyz - points[centers_idx]|`` (both float32 copies of the same numbers)."""

__all__ = ["ReleasedFormatError", "convert_released", "read_released_object", "read_released_patch_file"]


class ReleasedFormatError(ValueError):
    """A released ``patch_features.pt`` (or its object) does not have the documented content."""


def swap_yz(xyz: np.ndarray) -> np.ndarray:
    """The released ``prepare_points`` axis swap (its own inverse)."""
    return np.ascontiguousarray(xyz[:, [0, 2, 1]])


def read_released_patch_file(path: str | Path, n_points: int | None = None) -> dict[str, Any]:
    """Load and check one ``patch_features.pt`` (``weights_only=True``: tensors, str and int only).

    Returns ``centers (G, 3)`` float32 (released, y/z-swapped frame), ``features (G, D)`` float16,
    ``centers_idx (G,)`` int64 or ``None``, ``feature_dim``, ``item_id`` and ``img_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released patch targets {path} are missing")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ReleasedFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    missing = [k for k in ("centers_xyz", "patch_feats") if k not in obj]
    if missing:
        raise ReleasedFormatError(f"{path}: missing keys {missing} (has {sorted(obj)})")
    centers, feats = obj["centers_xyz"], obj["patch_feats"]
    if not isinstance(centers, Tensor) or centers.ndim != 2 or centers.shape[1] != 3:
        raise ReleasedFormatError(f"{path}: centers_xyz must be a (G, 3) tensor")
    g = centers.shape[0]
    if not isinstance(feats, Tensor) or feats.ndim != 2 or feats.shape[0] != g or feats.shape[1] < 1:
        raise ReleasedFormatError(
            f"{path}: patch_feats must be a ({g}, D) tensor, got {getattr(feats, 'shape', None)}"
        )
    dim = int(obj.get("feature_dim", feats.shape[1]))
    if dim != feats.shape[1]:
        raise ReleasedFormatError(f"{path}: feature_dim {dim} but patch_feats has width {feats.shape[1]}")
    idx = obj.get("centers_idx")
    if idx is not None:
        idx = torch.as_tensor(idx).reshape(-1).long()
        if idx.shape[0] != g:
            raise ReleasedFormatError(f"{path}: centers_idx has {idx.shape[0]} entries for {g} centres")
    if n_points is not None:
        for name in ("centers_idx", "patch_idx", "point2center"):
            t = obj.get(name)
            if t is None:
                continue
            t = torch.as_tensor(t)
            top = n_points if name != "point2center" else g
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= top):
                raise ReleasedFormatError(f"{path}: {name} indexes outside [0, {top})")
        if obj.get("point2center") is not None and torch.as_tensor(obj["point2center"]).numel() != n_points:
            raise ReleasedFormatError(f"{path}: point2center does not have one entry per point ({n_points})")
    f32 = feats.float()
    if not torch.isfinite(f32).all() or not torch.isfinite(centers.float()).all():
        raise ReleasedFormatError(f"{path}: non-finite centres or features")
    # The released loader L2-normalises at load time; doing it here (fp32, then fp16) keeps zero rows zero.
    f32 = torch.nn.functional.normalize(f32, dim=-1)
    return {
        "centers": centers.float().numpy().astype(np.float32),
        "features": f32.numpy().astype(np.float16),
        "centers_idx": None if idx is None else idx.numpy(),
        "feature_dim": dim,
        "item_id": obj.get("item_id"),
        "img_size": obj.get("img_size"),
    }


def _item_id(obj: Find3DObject) -> str:
    return obj.rendered_dir.parent.name  # rendered/<class>_<uid>/oriented


def read_released_object(
    obj: Find3DObject, feature_subdir: str = "patch_dino", frame: Frame = "released"
) -> ObjectSample:
    """One object as a compact sample: points, membership, patch targets, no per-point features."""
    if frame not in ("released", "find3d"):
        raise ValueError(f"frame must be 'released' or 'find3d', got {frame!r}")
    item_id = _item_id(obj)
    pts_path = obj.points_dir / "points.pt"
    if not pts_path.is_file():
        raise FileNotFoundError(f"{item_id}: {pts_path} is missing")
    points = torch.load(pts_path, map_location="cpu", weights_only=True)
    points = torch.as_tensor(points).float().reshape(-1, torch.as_tensor(points).shape[-1])[:, :3]
    pts = np.ascontiguousarray(points.numpy(), dtype=np.float32)
    n = pts.shape[0]
    patch_path = obj.rendered_dir / feature_subdir / PATCH_FILE
    rec = read_released_patch_file(patch_path, n_points=n)
    if rec["item_id"] is not None and rec["item_id"] != item_id:
        raise ReleasedFormatError(f"{patch_path}: item_id {rec['item_id']!r} but it sits under {item_id!r}")
    swapped = swap_yz(pts)
    centers = rec["centers"]
    if rec["centers_idx"] is not None:
        err = float(np.abs(swapped[rec["centers_idx"]] - centers).max())
        if err > CENTRE_TOLERANCE:
            raise ReleasedFormatError(
                f"{patch_path}: centers_xyz differ from the y/z-swapped points[centers_idx] by {err:.3g}; "
                "the file was written for another point sampling or frame"
            )
    else:  # no indices: every centre must still be one of the (swapped) points
        d = torch.cdist(torch.from_numpy(centers), torch.from_numpy(swapped)).min(dim=1).values
        if float(d.max()) > CENTRE_TOLERANCE:
            raise ReleasedFormatError(f"{patch_path}: a centre is {float(d.max()):.3g} from every point")
    membership, names = load_find3d_labels(obj)
    if frame == "released":
        points_out, centers_out, up = swapped, centers, "z"
    else:
        points_out, centers_out, up = pts, swap_yz(centers), "y"
    return ObjectSample(
        uid=obj.uid,
        points=points_out,
        features=np.zeros((n, 0), np.float16),
        membership=membership,
        part_names=names,
        meta={
            "category": obj.category,
            "source": "patchalign3d-released",
            "item_id": item_id,
            "split": obj.split,
            "up_axis": up,
            "frame": frame,
            "normalization": {"kind": "none", "note": "Find3D mesh frame, as the released training"},
            "teacher": f"released {feature_subdir}/{PATCH_FILE}",
            "teacher_img_size": rec["img_size"],
        },
        patch_centers=np.ascontiguousarray(centers_out, dtype=np.float32),
        patch_features=rec["features"],
    )


def convert_released(
    root: str | Path,
    out_dir: str | Path,
    split: str | None = "train",
    feature_subdir: str = "patch_dino",
    frame: Frame = "released",
    text_bank: str | Path | None = None,
    max_samples_per_shard: int = 1024,
    min_points: int = MIN_POINTS,
) -> dict[str, Any]:
    """Write every object of ``split`` (``None``: all) of a released data root into a shard set.

    Resumable (the writer skips finished uids). Objects with missing files or invalid content are
    skipped and counted by reason; a file in the wrong format for the frame check is such a skip.

    Returns ``{"written", "already_done", "skipped": {reason: count}, "manifest"}``.

    Raises:
        RuntimeError: nothing of the split could be converted (or found).
    """
    objs = [o for o in discover_find3d_objects(root) if split is None or o.split == split]
    if not objs:
        raise RuntimeError(f"no objects of split {split!r} under {root}")
    skipped: Counter[str] = Counter()
    written = done = 0
    with ShardSetWriter(out_dir, max_samples_per_shard=max_samples_per_shard, text_bank=text_bank) as w:
        for o in objs:
            if o.uid in w.done_uids:
                done += 1
                continue
            try:
                s = read_released_object(o, feature_subdir, frame)
                if s.num_points < min_points:
                    raise ShardFormatError(f"{o.uid}: {s.num_points} points < {min_points}", "too_few_points")
                w.write(s)
                written += 1
            except FileNotFoundError as e:
                _skip(skipped, "missing_file", e)
            except (ReleasedFormatError, ShardFormatError, ValueError) as e:
                _skip(skipped, getattr(e, "reason", "bad_format"), e)
        manifest = w.close()
    summary = {"written": written, "already_done": done, "skipped": dict(skipped), "manifest": str(manifest)}
    print(
        f"released data -> {out_dir}: wrote {written}, already there {done}, "
        f"skipped {sum(skipped.values())} {dict(skipped)} of {len(objs)} objects (split {split})"
    )
    if written + done == 0:
        raise RuntimeError(f"none of the {len(objs)} objects could be converted: {dict(skipped)}")
    return summary


def _skip(counter: Counter[str], reason: str, e: Exception) -> None:
    counter[reason] += 1
    if counter[reason] <= 5:
        log.warning("skipping (%s): %s", reason, e)


def released_parser() -> ArgumentParser:
    """The options of :func:`convert_released` (``python -m patchalign shards released`` uses it too)."""
    p = ArgumentParser(
        prog="python -m patchalign.engine.released", description=__doc__.split("\n")[0], exit_on_error=False
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("root", type=str, help="released data root (holds labeled/ or points/ + rendered/)")
    p.add_argument("out", type=str, help="output shard directory (resumed if it exists)")
    p.add_argument("--split", type=str, default="train", help="train, val or 'all'")
    p.add_argument("--feature_subdir", type=str, default="patch_dino", help="folder of patch_features.pt")
    p.add_argument("--frame", type=Frame, default="released", help="released (y/z swapped) or find3d")
    p.add_argument("--text_bank", type=str | None, default=None, help="text bank to attach to the set")
    p.add_argument("--max_samples_per_shard", type=int, default=1024, help="objects per shard file")
    return p


def run_released(args: Any) -> int:
    """Convert with parsed options; a missing root or nothing convertible is one line, exit 1."""
    logging.basicConfig(level=logging.WARNING)
    try:
        convert_released(
            args.root,
            args.out,
            None if args.split == "all" else args.split,
            args.feature_subdir,
            args.frame,
            args.text_bank,
            args.max_samples_per_shard,
        )
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m patchalign.engine.released ROOT OUT [--split train] ...`` (dashes or underscores)."""
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        ns = released_parser().parse_args(args)
    except ArgumentError as e:
        print(f"error: {one_line(e)} (see --help)", file=sys.stderr)
        return 2
    return run_released(ns)


if __name__ == "__main__":
    raise SystemExit(main())
