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

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


# ------------------------------------------------------------------------------------------ ablations

#: the four ablation tables of the talk / paper, in print order: key -> title
ABLATION_TABLES: dict[str, str] = {
    "strategy": "Training strategy",
    "text_encoder": "Text encoder (Stage 2)",
    "teacher": "2D teacher (Stage 1)",
    "freezing": "Stage 2 freezing (rows name what trains)",
}


@dataclass(frozen=True)
class AblationRow:
    """One row of the paper's ablation tables (ShapeNetPart, released convention), and its config.

    Numbers are the paper's as printed (main-paper Table ``tab:ablation_stage`` and the appendix,
    ``12_appendix.tex``; mIoU = instance, cIoU = category mIoU, percent); the talk prints the same
    mIoU rounded to one decimal and leaves out the "last three blocks" and "full encoder frozen"
    freezing rows (``in_talk=False``).

    Attributes:
        table: a key of :data:`ABLATION_TABLES`.
        key: the row's config name: ``configs/ablations/<table>/<key>.yaml``.
        label: the row as the paper prints it.
        metrics: ``instance_mIoU`` / ``category_mIoU`` in percent.
        stage1_config: the row's own Stage 1 config (teacher rows), else ``None`` (reference Stage 1 or none).
        eval_text_encoder: text encoder the evaluation must encode part names with (text rows).
        aliases: other run folders whose ShapeNetPart result is this row's (the reference Stage 2 run
            for the rows that are the reference recipe).
    """

    table: str
    key: str
    label: str
    metrics: Mapping[str, float]
    in_talk: bool = True
    stage1_config: str | None = None
    eval_text_encoder: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def config(self) -> str:
        return f"configs/ablations/{self.table}/{self.key}.yaml"

    @property
    def run_dir(self) -> str:
        """The row config's ``trainer.default_root_dir`` (tests check the config agrees)."""
        return f"outputs/ablations/{self.table}/{self.key}"

    @property
    def command(self) -> str:
        """Train (Stage 1 first where the row has its own), then evaluate on ShapeNetPart."""
        fits = ([self.stage1_config] if self.stage1_config else []) + [self.config]
        test = (
            "python -m patchalign test --config configs/eval/shapenetpart.yaml --data.init_args.root "
            f"DATA/shapenetcore_partanno_segmentation_benchmark_v0_normal --model.init_args.init_from "
            f"{self.run_dir}/checkpoints/last.ckpt --trainer.default_root_dir {self.run_dir}/shapenetpart"
        )
        if self.eval_text_encoder:
            test += f" --model.init_args.eval_text_encoder {self.eval_text_encoder}"
        return " && ".join([*(f"python -m patchalign fit --config {c}" for c in fits), test])


_REF = ("reference_stage2",)  # configs/reference/stage2.yaml's run folder: the "ours" row of every table


def _row(table: str, key: str, label: str, miou: float, ciou: float, **kw: Any) -> AblationRow:
    return AblationRow(table, key, label, {"instance_mIoU": miou, "category_mIoU": ciou}, **kw)


ABLATION_ROWS: tuple[AblationRow, ...] = (
    _row("strategy", "stage2_only", "Stage 2 only", 50.5, 50.0),
    _row("strategy", "joint", "Joint training", 50.2, 48.6),
    _row("strategy", "two_stage", "2-Stage (PatchAlign3D)", 56.9, 53.1, aliases=_REF),
    _row(
        "text_encoder",
        "siglip",
        "SigLIP",
        46.44,
        40.51,
        eval_text_encoder="hf:google/siglip-base-patch16-224",
    ),
    _row(
        "text_encoder",
        "gemma2_9b_it",
        "Gemma-2-9B-it",
        54.83,
        50.98,
        eval_text_encoder="hf:google/gemma-2-9b-it",
    ),
    _row("text_encoder", "openclip_bigg", "OpenCLIP ViT-bigG-14 (ours)", 56.90, 53.10, aliases=_REF),
    _row(
        "teacher",
        "dinov3",
        "DINOv3",
        46.52,
        42.76,
        stage1_config="configs/ablations/teacher/dinov3_stage1.yaml",
    ),
    _row(
        "teacher",
        "openclip_bigg_vision",
        "OpenCLIP ViT-bigG-14",
        49.32,
        52.96,
        stage1_config="configs/ablations/teacher/openclip_bigg_vision_stage1.yaml",
    ),
    _row(
        "teacher",
        "dinov1",
        "DINOv1",
        51.82,
        54.39,
        stage1_config="configs/ablations/teacher/dinov1_stage1.yaml",
    ),
    _row("teacher", "dinov2", "DINOv2 (ours)", 56.90, 53.10, aliases=_REF),
    _row("freezing", "full", "Full fine-tuning", 49.40, 48.75),
    _row("freezing", "last2", "Freeze last two blocks (= train the last two + head)", 55.70, 50.93),
    _row(
        "freezing",
        "last3",
        "Freeze last three blocks (= train the last three + head)",
        55.24,
        49.62,
        in_talk=False,
    ),
    _row(
        "freezing", "last1", "Freeze last block (= train the last + head; ours)", 56.90, 53.10, aliases=_REF
    ),
    _row("freezing", "frozen_encoder", "Full encoder frozen (head only)", 53.95, 50.10, in_talk=False),
)


def ablation_row_for(paths: Sequence[str | os.PathLike | None]) -> list[AblationRow]:
    """The ablation rows whose run folder one of ``paths`` lies in (a result file, or the checkpoint
    its evaluation read): a path with the consecutive parts ``ablations/<table>/<key>``, or a
    row's alias folder (``reference_stage2``). Matching by parts, not by prefix, keeps
    ``freezing/last1`` from also matching a ``last12`` folder and works from any working directory."""
    rows = []
    for row in ABLATION_ROWS:
        own = ("ablations", row.table, row.key)
        for p in paths:
            if p is None:
                continue
            parts = Path(p).parts
            hit = any(parts[i : i + 3] == own for i in range(len(parts) - 2)) or any(
                a in parts for a in row.aliases
            )
            if hit:
                rows.append(row)
                break
    return rows
