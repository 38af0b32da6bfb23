"""The fresh-machine main job, end to end at toy scale (the full run is `make demo`)."""

import json
from pathlib import Path

import pytest

from patchalign.demo import main


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards, out = tmp_path / "shards", tmp_path / "out"
    rc = main(["--shards", str(shards), "--out", str(out), "--n-objects", "64", "--stage1-steps", "2",
               "--stage2-steps", "2", "--batch-size", "4", "--eval-limit", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out categories (zero-shot)" in printed
    summary = json.loads((out / "summary.json").read_text())
    held = summary["heldout"]
    assert set(held["per_category"]) <= {"guitar", "rocket"} and held["per_category"]
    assert 0.0 <= held["instance_miou"] <= 1.0 and 0.0 <= held["chance_instance_miou"] <= 1.0
    assert not set(summary["seen_val"]["per_category"]) & {"guitar", "rocket"}
    assert (out / "export" / "model.safetensors").exists() and (out / "export" / "config.json").exists()
    pngs = list((out / "pictures").glob("*.png"))
    assert any(p.name.endswith("_parts.png") for p in pngs)
    assert any(p.name.endswith("_pca_stage1.png") for p in pngs)
    assert any(p.name.endswith("_pca_stage2.png") for p in pngs)
