"""``python -m patchalign report``: result files -> one Markdown report beside the talk's numbers.

Expected values come from the inputs written here by hand (scalars, per-category rows, a zerokey
evaluate JSON) and from the talk's numbers typed from its text, not from the report code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TALK_PART_SEGMENTATION

from patchalign.__main__ import main as patchalign_main
from patchalign.eval.evaluator import EvalReport
from patchalign.eval.references import TALK_REFERENCES, compare_part_segmentation, reference_key_for
from patchalign.eval.report import PartSegResult, collect_results, per_category_figure

# The talk's rows as printed (issue text), percent.
TALK = {
    **TALK_PART_SEGMENTATION,
    "keypointnet_zerokey": {"IoU@0.01": 13.16, "IoU@0.05": 56.60, "IoU@0.10": 79.43},
    "keypointnet_patchalign3d_zeroshot": {"IoU@0.10": 32.88},
    "keypointnet_patchalign3d_fewshot": {"IoU@0.10": 64.07},
}


def test_reference_table_is_the_talks() -> None:
    assert {k: dict(r.metrics) for k, r in TALK_REFERENCES.items()} == TALK
    assert (
        TALK_REFERENCES["shapenetpart"].confirmed and TALK_REFERENCES["shapenetpart"].convention == "released"
    )
    assert reference_key_for("objaverse", "seenclass") == "objaverse_seen"
    assert reference_key_for("shapenetpart_h5", "test") == "shapenetpart"
    assert reference_key_for("objaverse", "shapenetpart") is None  # no such row in the talk


def _scalars(released: tuple[float, float], find3d: tuple[float, float]) -> dict[str, float]:
    out = {"accuracy": 0.5}
    for conv, (inst, cat) in (("released", released), ("pointbert", (0.9, 0.9)), ("find3d", find3d)):
        out[f"{conv}/instance_mIoU"], out[f"{conv}/category_mIoU"] = inst, cat
    return out


def _write_run(run: Path, benchmark: str | None, scalars: dict, rows: list[dict], pictures: int = 0) -> Path:
    rep = EvalReport(scalars=scalars, rows=rows, info={"num_shapes": sum(r["num_shapes"] for r in rows)})
    rep.info["seconds_per_shape"] = 0.25
    rep.set_reference(benchmark)
    rep.save(run / "eval")
    if pictures:
        import matplotlib.pyplot as plt

        (run / "eval" / "viz").mkdir()
        for i in range(pictures):
            fig = plt.figure(figsize=(1, 1))
            fig.savefig(run / "eval" / "viz" / f"Cat_best{i}_x_parts.png")
            plt.close(fig)
    return run


def _row(cat: str, n: int, released: float, find3d: float) -> dict:
    return {"category": cat, "num_shapes": n, "released": released, "pointbert": 0.9, "find3d": find3d,
            "accuracy": 0.5}  # fmt: skip


def test_report_tables_charts_and_pictures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    snp = _write_run(
        tmp_path / "snp",
        "shapenetpart",
        _scalars((0.5, 0.4), (0.3, 0.2)),
        [_row("Airplane", 3, 0.6, 0.3), _row("Bag", 0, float("nan"), float("nan")), _row("Cap", 1, 0.2, 0.1)],
        pictures=3,
    )
    obj = _write_run(
        tmp_path / "obj", "objaverse_unseen", _scalars((0.1, 0.1), (0.3, 0.3)), [_row("mug", 1, 0.1, 0.3)]
    )
    kp = tmp_path / "kp"
    kp.mkdir()
    thresholds = [round(0.01 * i, 2) for i in range(11)]
    mean = [0.02 * i for i in range(11)]
    (kp / "eval.json").write_text(
        json.dumps(
            {"thresholds": thresholds, "iou": {"airplane": mean}, "mean_iou": mean, "shapes": {"airplane": 4}}
        )
    )
    (kp / "shape_0.json").write_text(json.dumps({"shape_id": "x", "keypoints": []}))  # a prediction: ignored
    out = tmp_path / "report"
    assert (
        patchalign_main(["report", str(snp), str(obj), str(kp), "--out", str(out), "--max-pictures", "2"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "not run (6 talk rows)" in printed  # partnete, faust, scanobjectnn, objaverse_seen, 2 PA3D kp rows
    md = (out / "report.md").read_text()
    # ours under the row's convention: ShapeNetPart released 50.00 vs 56.90; Objaverse find3d 30.00 vs 35.60
    assert (
        "| ShapeNetPart | instance_mIoU | released | 50.00 | 56.90 | -6.90 | 4 of 2874 (partial) | 0.2500 |"
        in md
    )
    assert "| ShapeNetPart | category_mIoU | released | 40.00 | 53.10 | -13.10 |" in md
    assert "| Objaverse-General, unseen categories | instance_mIoU | find3d | 30.00 | 35.60 | -5.60 |" in md
    # zerokey evaluate JSON: IoU at 0.01 / 0.05 / 0.10 = 2 / 10 / 20 %
    for metric, ours, talk in (("IoU@0.01", 2.0, 13.16), ("IoU@0.05", 10.0, 56.6), ("IoU@0.10", 20.0, 79.43)):
        assert f"| {metric} |  | {ours:.2f} | {talk:.2f} | {ours - talk:.2f} | 4 |" in md
    assert "not run: `python -m patchalign test --config configs/eval/partnete.yaml" in md
    assert "Partial runs" in md and "1 categories have no shape in this run: Bag" in md
    # pictures: two of three shown, with paths that resolve from the report's folder
    shown = [ln for ln in md.splitlines() if ln.startswith("![Cat_best")]
    assert len(shown) == 2 and "1 more in" in md
    for ln in shown:
        assert (out / ln.split("(")[1].rstrip(")")).is_file()
    for png in ("shapenetpart_0_per_category.png", "objaverse_unseen_1_per_category.png"):
        assert f"]({png})" in md and (out / png).stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "report.csv")))
    snp_inst = next(r for r in rows if r["benchmark"] == "shapenetpart" and r["metric"] == "instance_mIoU")
    assert float(snp_inst["ours"]) == pytest.approx(50.0) and float(snp_inst["talk"]) == 56.9


def test_chart_bars_are_ours_per_category_then_ours_and_talk(tmp_path: Path) -> None:
    run = _write_run(
        tmp_path / "snp",
        "shapenetpart",
        _scalars((0.5, 0.4), (0.3, 0.2)),
        [_row("Airplane", 3, 0.6, 0.3), _row("Bag", 0, float("nan"), float("nan")), _row("Cap", 1, 0.2, 0.1)],
    )
    (result,) = collect_results([run])
    assert isinstance(result, PartSegResult)
    fig = per_category_figure(result)
    heights = [round(p.get_height(), 6) for p in fig.axes[0].patches]
    # Airplane 60, Cap 20 (Bag has no shape), then category (ours 40, talk 53.1), instance (50, 56.9)
    assert heights == [60.0, 20.0, 40.0, 53.1, 50.0, 56.9]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["Airplane (3)", "Cap (1)", "category mIoU", "instance mIoU"]


def test_report_refuses_quiet_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert patchalign_main(["report", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no result file" in capsys.readouterr().err
    run = _write_run(
        tmp_path / "snp", "shapenetpart", _scalars((0.5, 0.4), (0.3, 0.2)), [_row("Cap", 1, 0.2, 0.1)]
    )
    assert patchalign_main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    before = (tmp_path / "r" / "report.md").read_text()
    assert patchalign_main(["report", str(run), "--out", str(tmp_path / "r")]) == 2  # an earlier report
    assert "exists" in capsys.readouterr().err and (tmp_path / "r" / "report.md").read_text() == before
    assert patchalign_main(["report", str(run), "--out", str(tmp_path / "r"), "--overwrite"]) == 0
    # a run named twice (e.g. through a symlink) is gathered once
    (tmp_path / "link").symlink_to(run)
    assert patchalign_main(["report", str(run), str(tmp_path / "link"), "--out", str(tmp_path / "r3")]) == 0
    md = (tmp_path / "r3" / "report.md").read_text()
    assert md.count("| ShapeNetPart | instance_mIoU |") == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    assert patchalign_main(["report", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_comparison_reads_the_rows_convention() -> None:
    rows = compare_part_segmentation(_scalars((0.5, 0.4), (0.3, 0.2)), TALK_REFERENCES["objaverse_seen"])
    assert rows == [
        {
            "metric": "instance_mIoU",
            "convention": "find3d",
            "ours": 30.0,
            "talk": 37.5,
            "delta": pytest.approx(-7.5),
        }
    ]


def test_report_on_real_shapenetpart_shapes(shared_data: Path, tmp_path: Path) -> None:
    """Script-path evaluation with pictures on the real shapes beside the checkout, then the report."""
    from test_eval_zeroshot import FakeTextEncoder

    from patchalign.eval.evaluator import run_zero_shot_eval
    from patchalign.eval.readers import ShapeNetPartTxt
    from patchalign.model import EncoderConfig, PatchAlignEncoder

    root = shared_data / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    if not root.is_dir():
        pytest.skip("real ShapeNetPart shapes not available")
    torch.manual_seed(0)
    rep = run_zero_shot_eval(
        PatchAlignEncoder(EncoderConfig.tiny(8)).eval(), ShapeNetPartTxt(root, "trainval"),
        FakeTextEncoder(8), batch_size=3, device="cpu", out_dir=tmp_path / "run", viz_per_category=1,
        verbose=False, benchmark="shapenetpart",
    )  # fmt: skip
    assert rep.info["benchmark"] == "shapenetpart" and rep.info["seconds_per_shape"] > 0
    out = tmp_path / "report"
    assert patchalign_main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    ours = 100 * rep.scalars["released/instance_mIoU"]
    assert (
        f"| ShapeNetPart | instance_mIoU | released | {ours:.2f} | 56.90 | {ours - 56.9:.2f} | 3 of 2874"
        in md
    )
    # Skateboard and Table: a best and a worst picture each (Table's one shape is both)
    assert sum(ln.startswith("![Skateboard_") for ln in md.splitlines()) == 2
    assert sum(ln.startswith("![Table_") for ln in md.splitlines()) == 2
    assert np.isclose(rep.info["comparison"][0]["ours"], ours)


def _bench_row(name: str, iou: tuple[float, float, float], sps: float) -> dict:
    iou_by_t = dict(zip(("0.01", "0.05", "0.10"), iou, strict=True))
    return {"row": name, "iou": iou_by_t, "seconds_per_shape": sps, "mllm_calls_per_shape": 0}


def test_feature_bench_rows_are_the_patchalign3d_keypoint_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``zerokey.features.bench --json_out`` rows: PatchAlign3D rows compared, oracle rows skipped."""
    rows = [
        _bench_row("patchalign zero-shot", (0.01, 0.1, 0.3), 0.5),
        _bench_row("patchalign few-shot K=5", (0.1, 0.4, 0.6), 0.7),
        _bench_row("zerokey (oracle)", (0.2, 0.5, 0.9), 2.0),
    ]
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb" / "feature_bench.json").write_text(json.dumps(rows))
    out = tmp_path / "r"
    assert patchalign_main(["report", str(tmp_path / "fb"), "--out", str(out)]) == 0
    assert "skipped 1 oracle-pointer rows" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    zs = "(zero-shot) [patchalign zero-shot] | IoU@0.10 |  | 30.00 | 32.88 | -2.88 | - | 0.5000 |"
    fs = "(few-shot) [patchalign few-shot K=5] | IoU@0.10 |  | 60.00 | 64.07 | -4.07 | - | 0.7000 |"
    assert zs in md and fs in md
    assert "| KeypointNet, ZeroKey (zero-shot) | IoU@0.10 |  | - | 79.43 |" in md  # the oracle is not ZeroKey


# ---------------------------------------------------------------------------------------- ablations

#: the paper's ablation rows (issue 22 text / docs/research section 2), mIoU / cIoU in percent
PAPER_ABLATIONS = {
    ("strategy", "joint"): (50.2, 48.6),
    ("freezing", "last2"): (55.70, 50.93),
    ("teacher", "dinov3"): (46.52, 42.76),
}


def test_report_lists_ablation_rows_beside_the_papers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run found by its folder (``outputs/ablations/<table>/<row>``) or by the checkpoint its saved
    eval config read fills its row; every other row shows its command; a plain run has no section."""
    # joint: the evaluation written inside the row's own folder
    joint = _write_run(
        tmp_path / "outputs" / "ablations" / "strategy" / "joint" / "shapenetpart",
        "shapenetpart",
        _scalars((0.4, 0.3), (0.2, 0.1)),
        [_row("Airplane", 2, 0.4, 0.2)],
    )
    # last2: evaluated into another folder; only its saved config.yaml names the row's checkpoint
    elsewhere = _write_run(
        tmp_path / "evals" / "freeze2",
        "shapenetpart",
        _scalars((0.5, 0.25), (0.2, 0.1)),
        [_row("Cap", 1, 0.5, 0.2)],
    )
    ckpt = "/scratch/outputs/ablations/freezing/last2/checkpoints/last.ckpt"
    (elsewhere / "config.yaml").write_text(f"model:\n  init_args:\n    init_from: {ckpt}\n")
    # a folder whose name only starts like a row's (last12) is no row
    near = _write_run(
        tmp_path / "outputs" / "ablations" / "freezing" / "last12" / "shapenetpart",
        "shapenetpart",
        _scalars((0.9, 0.9), (0.9, 0.9)),
        [_row("Mug", 1, 0.9, 0.9)],
    )
    out = tmp_path / "report"
    assert patchalign_main(["report", str(joint), str(elsewhere), str(near), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ablations: 2 of 15 rows run" in printed
    md = (out / "report.md").read_text()
    assert "## Ablations (ShapeNetPart, released convention)" in md
    j_m, j_c = PAPER_ABLATIONS[("strategy", "joint")]
    assert f"| Joint training | instance_mIoU | 40.00 | {j_m:.2f} | {40 - j_m:.2f} | 2 |" in md
    assert f"| Joint training | category_mIoU | 30.00 | {j_c:.2f} | {30 - j_c:.2f} | 2 |" in md
    l_m, _ = PAPER_ABLATIONS[("freezing", "last2")]
    assert f"instance_mIoU | 50.00 | {l_m:.2f} | {50 - l_m:.2f} | 1 |" in md
    d_m, _ = PAPER_ABLATIONS[("teacher", "dinov3")]
    dinov3 = next(ln for ln in md.splitlines() if ln.startswith("| DINOv3 | instance_mIoU"))
    assert f"| - | {d_m:.2f} | - |" in dinov3  # not run: its commands, Stage 1 first
    assert (
        "not run: `python -m patchalign fit --config configs/ablations/teacher/dinov3_stage1.yaml && "
        in dinov3
    )
    assert "90.00" not in md.split("## Ablations")[1]  # the last12 run filled nothing
    assert "(*paper only*)" in md  # last3 and full-encoder-frozen are not in the talk

    plain = _write_run(
        tmp_path / "plain", "shapenetpart", _scalars((0.5, 0.4), (0.3, 0.2)), [_row("Cap", 1, 0.5, 0.3)]
    )
    assert patchalign_main(["report", str(plain), "--out", str(tmp_path / "r2")]) == 0
    assert "## Ablations" not in (tmp_path / "r2" / "report.md").read_text()
    assert "ablations:" not in capsys.readouterr().out


def test_report_refuses_an_unreadable_saved_eval_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The saved config.yaml decides which ablation row a result fills: a broken one is an error, not a
    result silently left out of its row."""
    run = _write_run(
        tmp_path / "run", "shapenetpart", _scalars((0.5, 0.4), (0.3, 0.2)), [_row("Cap", 1, 0.5, 0.3)]
    )
    (run / "config.yaml").write_text("model: [unclosed\n")
    assert patchalign_main(["report", str(run), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable saved config of the evaluation" in err[0]
