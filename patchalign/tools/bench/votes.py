"""``python -m patchalign bench votes --model M``: does test-time voting help on the real shapes?

Every real part-labelled shape in ``../shared/data`` is segmented at full resolution through
:func:`patchalign.segment.segment_shape` (2048 points drawn, labels back to every input point) with
``votes`` in 1, 2, 4, 8, with and without rotations about the up axis, and scored against its
per-point ground truth (shape mIoU, released convention: a part absent from both prediction and
ground truth counts 1). Shapes: the ShapeNetPart txt shapes with >= 2 labelled parts (tables), the 16
Cap shapes (grid-sampled by torch-points3d, y-up like ShapeNetPart) and the PartNet-Mobility bottle
3763 (10,000 sampled points: body, neck, lid). Part names are the released evaluation's
(``PART_NAME_CANDIDATES``) for ShapeNetPart and the PartNet-Mobility semantics for the bottle.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def real_shapes(data: Path) -> list[dict[str, Any]]:
    """``{uid, points (N, 3) float32, labels (N,) local ids, names}`` of each real labelled shape."""
    from patchalign.eval.readers.shapenetpart import (
        SHAPENETPART_NUM_PARTS,
        SHAPENETPART_PART_NAME_SETS,
        SHAPENETPART_PART_START,
        SHAPENETPART_SYNSETS,
    )

    names = SHAPENETPART_PART_NAME_SETS["patchalign3d"]
    synset_cat = {v: k for k, v in SHAPENETPART_SYNSETS.items()}
    out = []
    raw = data / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    for f in sorted(raw.glob("*/*.txt")):
        cat = synset_cat[f.parent.name]
        a = np.loadtxt(f, dtype=np.float32)
        labels = a[:, 6].astype(np.int64) - SHAPENETPART_PART_START[cat]
        if len(np.unique(labels)) >= 2 and SHAPENETPART_NUM_PARTS[cat] >= 2:
            out.append({"uid": f"{cat}/{f.stem}", "points": a[:, :3], "labels": labels, "names": names[cat]})
    for f in sorted((data / "shapenetpart" / "cap_gridsampled").glob("*.txt")):
        a = np.loadtxt(f, dtype=np.float32)  # x y z nx ny nz label origin_id; labels 6-7
        labels = a[:, 6].astype(np.int64) - SHAPENETPART_PART_START["Cap"]
        out.append({"uid": f"Cap/{f.stem}", "points": a[:, :3], "labels": labels, "names": names["Cap"]})
    bottle = data / "partnet_mobility" / "3763" / "point_sample"
    if bottle.is_dir():
        pts = np.loadtxt(bottle / "pts-10000.txt", dtype=np.float32)[:, :3]
        raw_labels = np.loadtxt(bottle / "label-10000.txt", dtype=np.int64)
        lut = {5: 0, 6: 1, 7: 2}  # 5 body, 6 neck, 7 lid (the shared data's README)
        labels = np.array([lut.get(int(v), -1) for v in raw_labels], dtype=np.int64)
        out.append({"uid": "Bottle/3763", "points": pts, "labels": labels, "names": ["body", "neck", "lid"]})
    return out


def shape_miou(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Released convention: mean over the ``k`` parts of IoU, 1.0 for a part absent from both."""
    from patchalign.training.metrics import per_shape_miou

    m = per_shape_miou(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None], torch.tensor([k]))
    return float(m[0, 0])


def run(
    model: str,
    data: str | None = None,
    votes: list[int] | None = None,
    json_out: str | None = None,
) -> dict:
    """Mean shape mIoU on the real shapes for each voting setting.

    Args:
        model: export directory, checkpoint or Hub repo id.
        data: the shared data folder (default ``../shared/data`` beside the checkout).
        votes: vote counts to try (default 1 2 4 8).
        json_out: also write the table here.
    """
    from patchalign.pretrained import load_pretrained
    from patchalign.segment import segment_shape
    from patchalign.tools.paths import SHARED_DATA

    m = load_pretrained(model)
    shapes = real_shapes(Path(data) if data else SHARED_DATA)
    if not shapes:
        raise FileNotFoundError(f"no labelled real shapes under {data or SHARED_DATA}")
    texts = {}
    for s in shapes:
        key = tuple(s["names"])
        if key not in texts:
            texts[key] = m.text_embeddings(list(key))
    rows = []
    for v in votes or [1, 2, 4, 8]:
        for rotate in (False, True) if v > 1 else (False,):
            t0 = time.perf_counter()
            scores = []
            for s in shapes:
                seg = segment_shape(m, s["points"], texts[tuple(s["names"])], votes=v, rotate=rotate)
                scores.append(shape_miou(seg.point_labels.cpu().numpy(), s["labels"], len(s["names"])))
            rows.append(
                {
                    "votes": v,
                    "rotate": rotate,
                    "miou": float(np.mean(scores)),
                    "per_shape": dict(zip([s["uid"] for s in shapes], scores, strict=True)),
                    "s_per_shape": (time.perf_counter() - t0) / len(shapes),
                }
            )
    kinds = ", ".join(sorted({s["uid"].split("/")[0] for s in shapes}))
    print(f"{len(shapes)} real shapes ({kinds}), model {model}")
    print(f"{'votes':>5} {'rotate':>7} {'mean shape mIoU':>16} {'s / shape':>10}")
    for r in rows:
        print(f"{r['votes']:>5} {str(r['rotate']):>7} {r['miou']:>16.3f} {r['s_per_shape']:>10.3f}")
    result = {"model": model, "n_shapes": len(shapes), "rows": rows}
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    from patchalign.argv import run_cli

    return run_cli(
        run,
        argv,
        "python -m patchalign bench votes",
        positional=False,
        errors=(FileNotFoundError, ValueError),
    )
