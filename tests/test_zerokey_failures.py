"""One shape's failure is counted and listed, never the end of a run; bad inputs give one line."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import trimesh

from zerokey.module import ZeroKeyDataModule, ZeroKeyModule
from zerokey.pipeline import KeypointDetector, ShapePrediction, base_record
from zerokey.views import ViewConfig
from zerokey.writer import KeypointJSONWriter


class _RaisesOn(KeypointDetector):
    """Finds nothing; raises on one shape as the 200,000-point cloud's N x N cdist used to."""

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def predict(self, shape, device="cpu", keep_debug=False) -> ShapePrediction:
        if shape.shape_id == self.bad:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 160 GB")
        return ShapePrediction(base_record(shape) | {"keypoints": [], "names": [], "missing": []})


def _run(tmp_path: Path, module: ZeroKeyModule, inputs: list[str]) -> Path:
    out = tmp_path / "run"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[KeypointJSONWriter()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.predict(module, datamodule=ZeroKeyDataModule(inputs=inputs), return_predictions=False)
    return out


def test_a_shape_that_raises_is_listed_and_the_run_continues(tmp_path, capsys):
    for name in "abc":
        trimesh.creation.box().export(tmp_path / f"{name}.obj")
    out = _run(tmp_path, ZeroKeyModule(detector=_RaisesOn("b")), [str(tmp_path / "*.obj")])
    summary = json.loads((out / "summary_rank0.json").read_text())
    assert summary["shapes_done"] == 2 and summary["shapes_failed"] == 1
    assert summary["failed_shapes"][0]["shape_id"] == "b"
    assert "RuntimeError: DefaultCPUAllocator" in summary["failed_shapes"][0]["error"]
    assert json.loads((out / "b.json").read_text())["status"] == "failed"
    assert json.loads((out / "c.json").read_text())["status"] == "complete"  # after the failure
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "failed b: RuntimeError" in capsys.readouterr().out


def test_text_point_clouds_in_a_folder_are_read(tmp_path):
    """patchalign.io reads .txt clouds (x y z per line); a folder of them is not an empty run."""
    pts = torch.rand(64, 3).numpy()
    (tmp_path / "cloud.txt").write_text("\n".join(" ".join(f"{v:.6f}" for v in p) for p in pts))
    dm = ZeroKeyDataModule(inputs=[str(tmp_path)])
    dm.setup()
    shape = dm.dataset[0]
    assert shape.error is None and shape.faces is None and shape.vertices.shape == (64, 3)
    assert torch.allclose(shape.to_original(shape.vertices), torch.from_numpy(pts), atol=1e-5)


def test_detector_with_zerokey_settings_is_refused():
    with pytest.raises(ValueError, match="a detector takes its own"):
        ZeroKeyModule(detector=_RaisesOn("x"), views=ViewConfig(n_views=6))


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data.keypointnet_root", "/nope/kpn"], "data.keypointnet_root /nope/kpn does not exist"),
        (["--model.n_veiws", "6"], "unrecognized arguments: --model.n_veiws 6"),
        (["--model.views.n_veiws", "6"], "'n_veiws' is not accepted"),
        (["--model.views.n_views", "7"], "n_views must be one of [6, 26, 46]"),
        (["--data.split", "nosuch"], "split file"),
        # the authors' settings (issue 20): refused when the config is read
        (["--model.views.layout", "original", "--model.views.n_views", "46"], "has [6, 26] views, not 46"),
        (["--model.views.shading", "phong"], "Got value: phong"),
        (["--model.cluster.method", "originl"], "originl"),
        (["--model.voting", "disk"], "disk"),
        (["--model.disc_radius", "0"], "disc_radius must be > 0"),
    ],
)
def test_bad_predict_command_lines_are_one_line_and_exit_2(tmp_path, capsys, extra, expected):
    """Before: 73 lines of traceback for a missing root, 60-90 lines of usage for a misspelled key."""
    from conftest import SHARED_DATA

    from zerokey.__main__ import main

    args = ["predict", "--config", str(REPO / "configs" / "zerokey.yaml")]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--data.keypointnet_root"]
    args += [str(SHARED_DATA / "keypointnet"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("zerokey: error: ") and expected in err[0], err
    assert not (tmp_path / "run" / "run.json").exists()


def test_evaluate_and_bench_flags_keep_their_dashed_and_multi_value_forms(tmp_path, capsys):
    from zerokey.cli import normalise_argv
    from zerokey.evaluate import evaluate, main

    argv = ["--pred", "p", "--annotations", "a.json", "b c.json", "--pcd-root", "x", "--run-id=r"]
    argv += ["--thresholds", "0.01", "0.1"]
    assert normalise_argv(argv, evaluate) == [
        "--pred",
        "p",
        "--annotations",
        '["a.json", "b c.json"]',
        "--pcd_root",
        "x",
        "--run_id=r",
        "--thresholds",
        "[0.01, 0.1]",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", str(tmp_path), "--annotations", "a.json", "--pcd-root", "x", "--bogus", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --bogus 1" in err[0]
