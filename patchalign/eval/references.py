"""The numbers the talk reports, one row per benchmark, so every run can print ours beside them.

Source of every number: the PatchAlign3D / ZeroKey talk's result tables (PatchAlign3D, Hadgi et al.
2026, arXiv 2601.02457; ZeroKey's KeypointNet row). They are typed here once, as printed in the talk
(percent); tests check them against the talk's text, nothing computes them.

Each row records the **metric convention** we compare under (see :mod:`patchalign.eval.metrics`) and
whether that convention is *confirmed* by released evaluation code. Only the ShapeNetPart row is:
the released ``patchalign3d/inference/eval.py`` skips parts absent from a shape's ground truth
(our ``released`` convention). The released repository (dickoah/PatchAlign3D) ships no evaluation
script for the other benchmarks, so for them the convention is the one of the benchmark's own
released evaluation (Find3D's ``compute_3d_iou_upsample`` for the Objaverse splits,
ziqi-ma/Find3D ``model/evaluation/benchmark/eval_benchmark.py``), or ``released`` where no such
code exists; ``confirmed=False`` marks those, and reports print it. PartNetE uses Find3D's
convention: its "not a part" points (label -1) must count in a part's union, as in PartSLIP's
``compute_iou`` (Colin97/PartSLIP) and Find3D's ``compute_3d_iou_upsample``; under ``released`` they
are ignored, and a category with one part (Bottle: "lid") scores 100% whatever the model does.
All three conventions are always computed and written, so a reader can compare under another one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

TALK_SOURCE = "PatchAlign3D/ZeroKey talk tables (PatchAlign3D: arXiv 2601.02457)"


@dataclass(frozen=True)
class Reference:
    """One row of the talk's tables.

    Attributes:
        key: stable id (``shapenetpart``, ``objaverse_seen``, ``keypointnet_zerokey``, ...).
        title: what the talk calls the row.
        metrics: metric name -> value in percent, as printed in the talk. Part segmentation uses
            ``instance_mIoU`` / ``category_mIoU``; keypoints ``IoU@<threshold>``.
        convention: mIoU convention ours is compared under (part segmentation only).
        confirmed: whether released evaluation code confirms ``convention`` for this row.
        config: the config that reproduces the row (``None``: produced by another command).
        command: the one command that produces the row.
        needs: the data and weights the command needs.
        num_shapes: shapes in the talk's evaluation split, where its source states it (reports
            flag a run over fewer shapes as partial).
    """

    key: str
    title: str
    metrics: Mapping[str, float]
    convention: str | None = None
    confirmed: bool = False
    config: str | None = None
    command: str = ""
    needs: str = ""
    notes: str = ""
    num_shapes: int | None = None
    source: str = TALK_SOURCE
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = dict(self.metrics)
        d["extra"] = dict(self.extra)
        return d


_WEIGHTS = "the released patchalign3d.pt (or an export / Stage 2 checkpoint) + OpenCLIP ViT-bigG-14"


def _test_cmd(name: str, root: str) -> str:
    return (
        f"python -m patchalign test --config configs/eval/{name}.yaml "
        f"--data.init_args.root {root} --model.init_args.init_from patchalign3d.pt"
    )


TALK_REFERENCES: dict[str, Reference] = {
    r.key: r
    for r in [
        Reference(
            "shapenetpart",
            "ShapeNetPart",
            {"instance_mIoU": 56.9, "category_mIoU": 53.1},
            convention="released",
            confirmed=True,
            config="configs/eval/shapenetpart.yaml",
            command=_test_cmd("shapenetpart", "DATA/shapenetcore_partanno_segmentation_benchmark_v0_normal"),
            needs="ShapeNetPart ..._v0_normal (txt + official split, 2874 test shapes); " + _WEIGHTS,
            num_shapes=2874,  # shuffled_test_file_list.json
        ),
        Reference(
            "partnete",
            "PartNetE",
            {"instance_mIoU": 41.4, "category_mIoU": 42.2},
            convention="find3d",
            config="configs/eval/partnete.yaml",
            command=_test_cmd("partnete", "DATA/PartNetE"),
            needs="PartSLIP's PartNetE test.zip + PartNetE_meta.json (1906 shapes, 45 categories); "
            + _WEIGHTS,
        ),
        Reference(
            "faust",
            "FAUST (coarse)",
            {"instance_mIoU": 67.8, "category_mIoU": 67.8},
            convention="released",
            config="configs/eval/faust.yaml",
            command=_test_cmd("faust", "DATA/faust_satr"),
            needs="FAUST scans + SATR's coarse_gt.json and meshes.txt; " + _WEIGHTS,
            notes="the talk prints one number; FAUST has one category, so instance = category mIoU",
        ),
        Reference(
            "scanobjectnn",
            "ScanObjectNN (parts)",
            {"instance_mIoU": 22.7, "category_mIoU": 25.3},
            convention="released",
            config="configs/eval/scanobjectnn.yaml",
            command=_test_cmd("scanobjectnn", "DATA/ScanObjectNN"),
            needs="ScanObjectNN object_dataset_complete_with_parts_ (split_new.txt, *_part.bin); " + _WEIGHTS,
        ),
        Reference(
            "objaverse_seen",
            "Objaverse-General, seen categories",
            {"instance_mIoU": 37.5},
            convention="find3d",
            config="configs/eval/objaverse_seen.yaml",
            command=_test_cmd("objaverse_seen", "DATA/find3d_benchmark"),
            needs="Find3D's Objaverse benchmark (seenclass/, 50 shapes); " + _WEIGHTS,
            num_shapes=50,  # Find3D's benchmark README: 50 objects from 50 categories
        ),
        Reference(
            "objaverse_unseen",
            "Objaverse-General, unseen categories",
            {"instance_mIoU": 35.6},
            convention="find3d",
            config="configs/eval/objaverse_unseen.yaml",
            command=_test_cmd("objaverse_unseen", "DATA/find3d_benchmark"),
            needs="Find3D's Objaverse benchmark (unseen/, 50 shapes); " + _WEIGHTS,
            num_shapes=50,  # Find3D's benchmark README: 50 objects from 50 categories
        ),
        Reference(
            "keypointnet_zerokey",
            "KeypointNet, ZeroKey (zero-shot)",
            {"IoU@0.01": 13.16, "IoU@0.05": 56.60, "IoU@0.10": 79.43},
            command=(
                "python -m zerokey predict --config configs/zerokey.yaml && python -m zerokey evaluate "
                "--pred outputs/zerokey --annotations ANN.json --pcd-root PCDS "
                "--out outputs/zerokey/eval.json"
            ),
            needs="KeypointNet annotations + pcds (+ meshes for rendering); Molmo-7B-D and an MLLM namer",
            extra={"method": "zerokey"},
        ),
        Reference(
            "keypointnet_patchalign3d_zeroshot",
            "KeypointNet, PatchAlign3D features (zero-shot)",
            {"IoU@0.10": 32.88},
            command=(
                "python -m zerokey.features.bench --model patchalign3d.pt --root KEYPOINTNET "
                "--json_out outputs/feature_bench.json"
            ),
            needs="KeypointNet annotations + pcds; " + _WEIGHTS,
            extra={"method": "patchalign3d_zeroshot"},
        ),
        Reference(
            "keypointnet_patchalign3d_fewshot",
            "KeypointNet, PatchAlign3D features (few-shot)",
            {"IoU@0.10": 64.07},
            command=(
                "python -m zerokey.features.bench --model patchalign3d.pt --root KEYPOINTNET "
                "--json_out outputs/feature_bench.json"
            ),
            notes="the talk does not state the support size; feature_bench reports K=1 and K=5",
            needs="KeypointNet annotations + pcds; " + _WEIGHTS,
            extra={"method": "patchalign3d_fewshot"},
        ),
    ]
}

PART_SEGMENTATION_KEYS: tuple[str, ...] = (
    "shapenetpart",
    "partnete",
    "faust",
    "scanobjectnn",
    "objaverse_seen",
    "objaverse_unseen",
)


def get_reference(key: str) -> Reference:
    """The talk's row ``key``; an unknown key is an error listing the known ones."""
    if key not in TALK_REFERENCES:
        raise ValueError(f"no talk reference {key!r}; known: {', '.join(TALK_REFERENCES)}")
    return TALK_REFERENCES[key]


def reference_key_for(dataset: str, split: str) -> str | None:
    """The talk row a reader kind + split reproduces, or ``None`` when the talk has no such row.

    ``scanobjectnn_h5`` maps to none: that release has no part labels (object vs background only).
    """
    if dataset in ("shapenetpart", "shapenetpart_h5"):
        return "shapenetpart" if split == "test" else None
    if dataset in ("partnete", "faust", "scanobjectnn"):
        return dataset if split == "test" or dataset == "faust" else None
    if dataset == "objaverse":
        return {"seenclass": "objaverse_seen", "unseen": "objaverse_unseen"}.get(split)
    return None


def compare_part_segmentation(scalars: Mapping[str, float], ref: Reference) -> list[dict[str, Any]]:
    """Rows ``{metric, convention, ours, talk, delta}`` (percent) for each of the talk's metrics.

    ``scalars`` are an :class:`~patchalign.eval.evaluator.EvalReport`'s (0..1,
    ``"<convention>/<metric>"``).
    """
    if ref.convention is None:
        raise ValueError(f"{ref.key} is not a part-segmentation row")
    rows = []
    for metric, talk in ref.metrics.items():
        value = scalars.get(f"{ref.convention}/{metric}")
        ours = None if value is None or value != value else 100.0 * float(value)
        rows.append(
            {
                "metric": metric,
                "convention": ref.convention,
                "ours": ours,
                "talk": float(talk),
                "delta": None if ours is None else ours - float(talk),
            }
        )
    return rows
