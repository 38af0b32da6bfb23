"""The fresh-machine main job, end to end at toy scale (the full run is `make demo`)."""

import json
from pathlib import Path

import pytest

from patchalign.engine.sources.demo import HELDOUT_CATEGORIES, SEEN_CATEGORIES, UNSEEN_NAME_CATEGORIES
from patchalign.tools.demo import main


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
    # Shards from another teacher are refused, not mixed.
    with pytest.raises(SystemExit, match="another demo version or teacher"):
        main([*args[:-4], "--teacher", "dinov2-random:5"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_bench_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ablation bench trains each arm on the same budget and prints held-out mIoU per arm."""
    from patchalign.tools.bench.demo import main as bench_main

    args = ["--shards", str(tmp_path / "real"), "--random-shards", str(tmp_path / "rand"),
            "--out", str(tmp_path / "bench"), "--n-objects", "51", "--stage1-steps", "2",
            "--stage2-steps", "2", "--batch-size", "4", "--eval-limit", "4", "--teacher", "dinov2-random:1",
            "--random-teacher", "dinov2-random:2", "--arms", "random teacher", "no Stage 1"]  # fmt: skip
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out categories, shared part names (zero-shot)" in printed
    assert (
        printed.count("random teacher  instance mIoU") == 3 and printed.count("no Stage 1      instance") == 3
    )
    (run,) = (tmp_path / "bench").iterdir()
    results = json.loads((run / "bench.json").read_text())["results"]
    assert set(results) == {"random teacher", "no Stage 1"}
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
