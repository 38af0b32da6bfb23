"""The fresh-machine main job: its scoring and real-data lines on hand-worked and shared shapes, its
refusals, and the whole run end to end at toy scale (the full run is `make demo`)."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from patchalign.engine.sources.demo import (
    DEMO_N_OBJECTS,
    HELDOUT_CATEGORIES,
    SEEN_CATEGORIES,
    UNSEEN_NAME_CATEGORIES,
    build_demo,
)
from patchalign.tools.demo import demo, main, score_shapes, shapenetpart_lines


class _ConstantModel:
    """Predicts local part 1 at every point (``segment`` as :class:`PretrainedPatchAlign` has it)."""

    def segment(self, points: torch.Tensor, text: torch.Tensor) -> object:
        assert text.shape[0] >= 2  # one text vector per part name
        return type("Seg", (), {"labels": torch.ones(points.shape[1], dtype=torch.long)})()


def _text(names: list[str]) -> torch.Tensor:
    return torch.zeros(len(names), 4)


def test_score_shapes_on_hand_worked_shapes() -> None:
    """Exact released-convention numbers; every point sampled (num_points = shape size, no repeats)."""
    parts = ["a", "b", "c"]
    shapes = [  # constant part 1 -> IoU(1) = share of part 1, other present parts 0
        ("t1", "Table", np.zeros((100, 3)), np.repeat([0, 1, 2], [60, 30, 10]), parts),  # (0.3+0+0)/3 = 0.1
        ("s1", "Skateboard", np.zeros((100, 3)), np.ones(100, dtype=np.int64), parts),  # one part: 1.0
        ("t2", "Table", np.zeros((100, 3)), np.repeat([0, 1, -1], [40, 40, 20]), parts),  # (0+0.5)/2 = 0.25
    ]
    r = score_shapes(_ConstantModel(), shapes, _text, num_points=100)
    assert r["n_shapes"] == 3 and r["one_part_shapes"] == 1
    assert r["instance_miou"] == pytest.approx((0.1 + 1.0 + 0.25) / 3)
    assert r["category_miou"] == pytest.approx(((0.1 + 0.25) / 2 + 1.0) / 2)
    assert r["per_category"]["Table"]["miou"] == pytest.approx(0.175) and r["per_category"]["Table"]["n"] == 2
    assert [s["miou"] for s in r["shapes"]] == pytest.approx([0.1, 1.0, 0.25])
    multi = r["multi_part"]  # without the one-part skateboard
    assert multi["n_shapes"] == 2 and set(multi["per_category"]) == {"Table"}
    assert multi["instance_miou"] == pytest.approx(0.175) and multi["category_miou"] == pytest.approx(0.175)
    assert 0.0 < r["chance_instance_miou"] < 1.0


def test_real_data_line_is_per_category_and_leaves_one_part_shapes_out(snp_root: Path) -> None:
    """Issue 19 item 10: on the shared ShapeNetPart shapes two one-part skateboards scored 1.0 and carried
    the headline while the tables scored below chance."""
    from patchalign.eval.readers import ShapeNetPartTxt

    datasets = [ShapeNetPartTxt(snp_root, split) for split in ("test", "train")]  # what is on disk
    items = [ds[i] for ds in datasets for i in range(len(ds))]
    shapes = [(it["uid"], it["category"], it["points"], it["labels"], it["part_names"]) for it in items]
    assert sorted(s[1] for s in shapes) == ["Skateboard", "Skateboard", "Table", "Table"]
    r = score_shapes(_ConstantModel(), shapes, _text)
    # Expectations from the files' own label counts: constant "deck" / "leg or support" (local part 1).
    expected = {}
    for uid, _, _, labels, _ in shapes:
        present = np.unique(labels[labels >= 0])
        expected[uid] = (labels == 1).sum() / (labels >= 0).sum() / len(present)
    assert sorted(expected.values())[-2:] == [1.0, 1.0]  # the skateboards: deck only
    assert r["one_part_shapes"] == 2
    assert r["per_category"]["Skateboard"]["miou"] == 1.0
    tables = [v for uid, v in expected.items() if uid.startswith("04379243")]
    assert r["per_category"]["Table"]["miou"] == pytest.approx(np.mean(tables), abs=0.015)
    assert r["multi_part"]["n_shapes"] == 2 and set(r["multi_part"]["per_category"]) == {"Table"}
    assert r["multi_part"]["instance_miou"] == pytest.approx(np.mean(tables), abs=0.015)
    assert r["instance_miou"] > 0.5 > r["multi_part"]["instance_miou"]  # what the old single line hid
    lines = "\n".join(shapenetpart_lines(r, snp_root))
    assert ">= 2 labelled parts" in lines and "2 of 4 shapes have one labelled part" in lines
    assert "Skateboard mIoU 1.000" in lines and "Table" in lines and "(2 shapes)" in lines
    assert shapenetpart_lines(None, snp_root / "nope")[0].startswith("ShapeNetPart: skipped")


def test_demo_object_count_is_the_engines_one_constant() -> None:
    from patchalign.tools.bench.demo import bench_demo

    counts = {
        f.__name__: inspect.signature(f).parameters["n_objects"].default
        for f in (demo, bench_demo, build_demo)
    }
    assert set(counts.values()) == {DEMO_N_OBJECTS}, counts


def test_demo_refuses_shards_from_another_teacher_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    (shards / "work").mkdir(parents=True)
    (shards / "work" / "config.json").write_text(json.dumps({"teacher": "dinov2-random:5"}))
    assert main(["--shards", str(shards), "--out", str(tmp_path / "out"), "--no-baseline"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another demo version or teacher" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards, out = tmp_path / "shards", tmp_path / "out"
    args = ["--shards", str(shards), "--out", str(out), "--n-objects", "51", "--stage1-steps", "2",
            "--stage2-steps", "2", "--batch-size", "4", "--eval-limit", "6", "--teacher", "dinov2-random",
            "--shapenetpart", str(tmp_path / "no-shapenetpart")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for label in ("seen categories (val)", "shared part names (zero-shot)", "unseen part names (zero-shot)"):
        assert label in printed
    assert "teacher:      dinov2-random" in printed and "text encoder: sentence-transformers" in printed
    assert "ShapeNetPart: skipped" in printed and "RANDOM DINOv2" in printed
    summary = json.loads((out / "summary.json").read_text())
    splits, base = summary["splits"], summary["no_stage1"]
    assert set(splits) == set(base) == {"val", "heldout", "unseen_names"}
    assert set(splits["heldout"]["per_category"]) <= set(HELDOUT_CATEGORIES)
    assert set(splits["unseen_names"]["per_category"]) <= set(UNSEEN_NAME_CATEGORIES)
    assert set(splits["val"]["per_category"]) <= set(SEEN_CATEGORIES)
    for r in [*splits.values(), *base.values()]:
        assert 0.0 <= r["instance_miou"] <= 1.0 and 0.0 < r["chance_instance_miou"] < 1.0
        assert r["n_shapes"] == sum(c["n"] for c in r["per_category"].values())
        assert r["n_shapes"] == 6 and "shapes" not in r
    assert (out / "export" / "model.safetensors").exists() and (
        out / "export_no_stage1" / "config.json"
    ).exists()
    pngs = list((out / "pictures").glob("*.png"))
    assert any(p.name.endswith("_parts.png") for p in pngs)
    assert any(p.name.endswith("_pca_stage1.png") for p in pngs)
    assert any(p.name.endswith("_pca_stage2.png") for p in pngs)

    # A second run never overwrites the first: the old run is moved aside, the shards are reused.
    assert main([*args, "--no-baseline"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out-")]
    assert len(moved) == 1 and (moved[0] / "summary.json").is_file()
    assert "demo shards found" in capsys.readouterr().out
    # Shards from another teacher are refused, not mixed: one line, exit 1.
    assert main([*args[:-4], "--teacher", "dinov2-random:5"]) == 1
    assert "another demo version or teacher" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_bench_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ablation bench trains each arm on the same budget and prints held-out mIoU per arm."""
    from patchalign.tools.bench.demo import main as bench_main

    args = ["--shards", str(tmp_path / "real"), "--random-shards", str(tmp_path / "rand"),
            "--out", str(tmp_path / "bench"), "--n-objects", "51", "--stage1-steps", "2",
            "--stage2-steps", "2", "--batch-size", "4", "--eval-limit", "4", "--teacher", "dinov2-random:1",
            "--random-teacher", "dinov2-random:2",
            "--arms", "random teacher", "no Stage 1", "joint"]  # fmt: skip
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out categories, shared part names (zero-shot)" in printed
    assert (
        printed.count("random teacher  instance mIoU") == 3 and printed.count("no Stage 1      instance") == 3
    )
    assert printed.count("joint           instance mIoU") == 3
    assert "joint training                50.2" in printed and "Stage 2 only                  50.5" in printed
    (run,) = (tmp_path / "bench").iterdir()
    results = json.loads((run / "bench.json").read_text())["results"]
    assert set(results) == {"random teacher", "no Stage 1", "joint"}
    # the joint arm: one run of Stage 1 + Stage 2 steps (2 + 2), both heads, from the real-teacher shards
    joint_ckpt = torch.load(run / "joint-seed0" / "joint" / "checkpoints" / "last.ckpt", weights_only=False)
    assert joint_ckpt["global_step"] == 4 and "distill_head.proj.weight" in joint_ckpt["state_dict"]
    for arm in results.values():
        assert 0.0 <= arm[0]["heldout"]["instance_miou"] <= 1.0
    # Each arm used its own teacher's shards; the objects are the same.
    teachers = {
        k: json.loads((tmp_path / k / "work" / "teacher.json").read_text())["teacher_id"]
        for k in ("real", "rand")
    }
    assert "seed=1" in teachers["real"] and "seed=2" in teachers["rand"]
    objects = [(tmp_path / k / "work" / "objects.jsonl").read_text() for k in ("real", "rand")]
    assert objects[0] == objects[1]


def test_bench_joint_arm_is_the_stage2_recipe_with_the_joint_module(tmp_path: Path) -> None:
    """Only the module, the start (random encoder), what trains and the teacher features differ from
    the two-stage arm's Stage 2 config; loss, augmentation, schedule and learning rates are its own."""
    import yaml

    from patchalign.tools.bench.demo import joint_config
    from patchalign.tools.paths import REPO_ROOT

    cfg = yaml.safe_load(joint_config(tmp_path / "joint.yaml").read_text())
    stage2 = yaml.safe_load((REPO_ROOT / "configs" / "stage2.yaml").read_text())
    assert cfg["model"]["class_path"] == "patchalign.training.modules.JointTraining"
    init, ref = cfg["model"]["init_args"], stage2["model"]["init_args"]
    assert init["init_from"] is None and init["trainable"] == "all" and init["joint_weight"] == 1.0
    assert "freeze_blocks" not in init and cfg["data"]["init_args"]["load_features"] is True
    same = {k: v for k, v in ref.items() if k not in ("init_from", "trainable", "freeze_blocks")}
    assert {k: init[k] for k in same} == same  # loss: siglip, optim, encoder, category-label drop
    assert cfg["trainer"] == stage2["trainer"]
    data = {k: v for k, v in cfg["data"]["init_args"].items() if k != "load_features"}
    assert data == {k: v for k, v in stage2["data"]["init_args"].items() if k != "load_features"}


def test_strategy_table_puts_each_arm_beside_the_talk() -> None:
    from patchalign.tools.bench.demo import strategy_lines

    def run(seen: float, heldout: float, unseen: float) -> dict:
        return {
            s: {"instance_miou": v}
            for s, v in (("val", seen), ("heldout", heldout), ("unseen_names", unseen))
        }

    results = {"real teacher": [run(0.6, 0.62, 0.15), run(0.62, 0.64, 0.17)], "joint": [run(0.5, 0.4, 0.1)]}
    lines = strategy_lines(results)
    two_stage = next(ln for ln in lines if "two-stage" in ln)
    assert "56.9" in two_stage and "0.610±0.010 / 0.630±0.010 / 0.160±0.010" in two_stage
    assert "2 seed(s)" in two_stage
    joint = next(ln for ln in lines if "joint training" in ln)
    assert "50.2" in joint and "0.500 / 0.400 / 0.100" in joint
    assert not any("Stage 2 only" in ln for ln in lines)  # not run: no row
    assert strategy_lines({"random teacher": [run(0.1, 0.1, 0.1)]}) == []
