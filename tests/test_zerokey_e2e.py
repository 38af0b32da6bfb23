"""End to end: ``python -m zerokey predict`` (LightningCLI) with the OraclePointer on real KeypointNet
shapes -- the chair rendered from its mesh, airplanes from their point clouds -- writing JSON (+ PNGs),
then ``python -m zerokey evaluate`` on the output; and the data readers' handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT as REPO

from zerokey.__main__ import main
from zerokey.cluster import ClusterConfig
from zerokey.data import FileShapeDataset, KeypointNetDataset, load_shape, read_pcd
from zerokey.mllm.namers import KeypointNetNamer, StaticNamer
from zerokey.mllm.pointers import OraclePointer
from zerokey.module import ZeroKeyDataModule, ZeroKeyModule
from zerokey.views import ViewConfig
from zerokey.writer import KeypointJSONWriter

KPN = REPO / ".." / "shared" / "data" / "keypointnet"
CHAIR = "88382b877be91b2a572f8e1c1caad99e"
PLANES = ["1b300fd9ad4050e6301fa0a0663ee996", "1d6afc44b053ab07941d71475449eb25"]

needs_data = pytest.mark.skipif(not KPN.is_dir(), reason="shared KeypointNet data not available")


def _predict_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--config",
        str(REPO / "configs" / "zerokey.yaml"),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--model.namer.init_args.semantic_names",
        str(KPN / "semantic_names.json"),
        "--model.pointer.init_args.noise_px",
        "0",
        "--model.pointer.init_args.dropout",
        "0",
        "--model.pointer.init_args.outlier_rate",
        "0",
        "--model.views.image_size",
        "160",
        "--data.keypointnet_root",
        str(KPN),
        *extra,
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_data
def test_predict_cli_then_evaluate_on_real_keypointnet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd lands in tmp_path
    out = tmp_path / "run"
    main(
        _predict_args(
            out,
            "--trainer.callbacks.init_args.save_views_png",
            "true",
            "--trainer.callbacks.init_args.save_shape_png",
            "true",
            "--data.model_ids",
            json.dumps([CHAIR, *PLANES]),
        )
    )
    printed = capsys.readouterr().out
    assert f"files in {out}" in printed and "3 done, 0 skipped (complete before), 0 failed" in printed
    assert "OraclePointer" in printed and "3D half" in printed  # the shipped default says what it is
    chair = json.loads((out / "03001627" / f"{CHAIR}.json").read_text())
    plane = json.loads((out / "02691156" / f"{PLANES[0]}.json").read_text())
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and (out / "config.yaml").exists()
    assert chair["source"].endswith(".ply") and plane["source"].endswith(".pcd")
    for record in (chair, plane):
        assert record["status"] == "complete" and record["error"] is None and record["keypoints"]
        assert record["run_id"] == manifest["run_id"] and record["config_hash"] == manifest["config_hash"]
        assert record["mllm_calls"] == {"namer": 0, "pointer": 0}
        assert record["parse_stats"]["pointer"]["points"] == record["counts"]["points2d"] > 0
        assert record["counts"]["views"] == 26
        assert set(record["timings"]) >= {"render", "point", "lift", "cluster"}
        kp = record["keypoints"][0]
        assert {"name", "instance", "xyz", "xyz_normalized", "support"} <= set(kp)
        assert (
            kp["support"]["views"] >= 1 and kp["support"]["candidates"] >= 10 and kp["support"]["density"] > 0
        )
        # xyz is in the input (pcd) frame: normalised * scale + center.
        frame = record["frame"]
        assert np.allclose(
            np.array(kp["xyz_normalized"]) * frame["scale"] + frame["center"], kp["xyz"], atol=1e-5
        )
    # Predictions land on the annotated keypoints (zero noise): every GT has a prediction within 0.03
    # (the shape's radius is ~0.47; one pixel at 160 px is ~0.007).
    sample = KeypointNetDataset(KPN, model_ids=[CHAIR])[0]
    gt = sample.to_original(sample.keypoints).numpy()
    pred = np.array([k["xyz"] for k in chair["keypoints"]])
    assert np.linalg.norm(gt[:, None] - pred[None], axis=-1).min(1).max() < 0.03
    assert (out / "03001627" / f"{CHAIR}_views.png").stat().st_size > 0
    assert (out / "02691156" / f"{PLANES[1]}_shape.png").stat().st_size > 0
    summary = json.loads((out / "summary_rank0.json").read_text())
    assert summary["shapes_done"] == 3 and summary["failed_shapes"] == [] and summary["status"] == "finished"

    evaluate = [
        "evaluate",
        "--pred",
        str(out),
        "--annotations",
        str(KPN / "annotations" / "airplane.json"),
        str(KPN / "annotations" / "chair.json"),
        "--pcd-root",
        str(KPN / "pcds"),
    ]
    result_path = tmp_path / "iou.json"
    main([*evaluate, "--out", str(result_path)])
    result = json.loads(result_path.read_text())
    at = {round(t, 2): i for i, t in enumerate(result["thresholds"])}
    assert result["shapes"] == {"airplane": 2, "chair": 1} and result["run_id"] == manifest["run_id"]
    # (the chair repeats names per leg: extra clusters of one leg cost precision, 5 of 6 here)
    assert result["iou"]["chair"][at[0.1]] >= 0.8 and result["iou"]["airplane"][at[0.1]] >= 0.85
    assert result["iou"]["airplane"][at[0.0]] <= result["iou"]["airplane"][at[0.1]]
    # --split: the three shapes here are all in KeypointNet's train split, none in test.
    main([*evaluate, "--split", "train", "--out", str(result_path)])
    assert json.loads(result_path.read_text())["shapes"] == {"airplane": 2, "chair": 1}
    with pytest.raises(SystemExit, match="no shape could be scored.*not_in_split': 3"):
        main([*evaluate, "--split", "test"])

    # Rerun with the same settings: resumes, every shape already complete is skipped, files untouched.
    before = _snapshot(out)
    main(_predict_args(out, "--data.model_ids", json.dumps([CHAIR, *PLANES])))
    assert "0 done, 3 skipped (complete before), 0 failed" in capsys.readouterr().out
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k.endswith(".json") and "/" in k} == {
        k: v for k, v in before.items() if k.endswith(".json") and "/" in k
    }
    assert "config.resume1.yaml" in after  # the first config.yaml is kept
    # Other settings into the same folder: refused before anything is written.
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        main(_predict_args(out, "--model.patch_size", "3", "--data.model_ids", json.dumps([CHAIR])))
    assert exit_info.value.code == 2 and "made with other settings" in capsys.readouterr().err
    assert _snapshot(out) == before

    # Predictions of another run mixed into the folder: evaluate refuses, or scores one run by id.
    other = json.loads((out / "03001627" / f"{CHAIR}.json").read_text())
    other["run_id"] = "someone-else"
    (out / "03001627" / "other.json").write_text(json.dumps(dict(other, shape_id="03001627/other")))
    with pytest.raises(SystemExit, match="several runs are mixed"):
        main(evaluate)
    main([*evaluate, "--run-id", manifest["run_id"], "--out", str(result_path)])
    assert json.loads(result_path.read_text())["shapes"] == {"airplane": 2, "chair": 1}


def _box_obj(path: Path) -> Path:
    import trimesh

    trimesh.creation.box(extents=(2.0, 1.0, 0.5)).export(path)
    return path


def test_bad_files_are_skipped_counted_and_written(tmp_path):
    good = _box_obj(tmp_path / "box.obj")
    (tmp_path / "empty.obj").write_text("# nothing\n")
    (tmp_path / "broken.pcd").write_text("FIELDS x y z\nDATA binary\n")
    dm = ZeroKeyDataModule(inputs=[str(tmp_path)], category="box")
    # Every corner of the box is a keypoint named "corner"; the oracle needs them on the sample.
    module = ZeroKeyModule(
        StaticNamer(["corner"] * 8),
        OraclePointer(),
        views=ViewConfig(image_size=96),
        cluster=ClusterConfig(min_samples=5, min_cluster_size=5),
    )
    dm.setup()
    corners = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-0.5, 0.5) for sz in (-0.25, 0.25)])

    base = dm.dataset

    class WithCorners(torch.utils.data.Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            s = base[i]
            if s.error is None:
                s.keypoints, s.keypoint_names = s.to_normalised(corners), ["corner"] * 8
            return s

    dm.dataset = WithCorners()
    writer = KeypointJSONWriter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path / "out"),
    )
    assert trainer.predict(module, datamodule=dm, return_predictions=False) is None
    summary = json.loads((tmp_path / "out" / "summary_rank0.json").read_text())
    assert summary["shapes_done"] == 1 and summary["shapes_failed"] == 2
    assert sorted(f["shape_id"] for f in summary["failed_shapes"]) == ["broken", "empty"]
    broken = json.loads((tmp_path / "out" / "broken.json").read_text())
    assert broken["status"] == "failed" and broken["error"] and broken["keypoints"] == []
    box = json.loads((tmp_path / "out" / "box.json").read_text())
    pred = np.array([k["xyz"] for k in box["keypoints"]])
    # 8 corners, each found (visible corners of a box: every one is seen by several of the 26 views).
    assert len(pred) == 8
    assert np.linalg.norm(corners.numpy()[:, None] - pred[None], axis=-1).min(1).max() < 0.05
    assert good.exists()


def test_readers_reject_bad_input_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shape files"):
        FileShapeDataset([str(tmp_path / "missing*.obj")])
    with pytest.raises(ValueError, match="exactly one"):
        ZeroKeyDataModule()
    (tmp_path / "a.pcd").write_text("VERSION .7\nFIELDS x y z rgb\nPOINTS 2\nDATA ascii\n1 2 3 255\n1 2\n")
    with pytest.raises(ValueError):
        read_pcd(tmp_path / "a.pcd")
    (tmp_path / "n.pcd").write_text("VERSION .7\nFIELDS x y z\nPOINTS 1\nDATA ascii\nnan 0 0\n")
    with pytest.raises(ValueError, match="non-finite"):
        read_pcd(tmp_path / "n.pcd")
    header = "VERSION .7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\nPOINTS 2\nDATA ascii\n"
    (tmp_path / "b.pcd").write_text(header + "0 0 0 16711680\n1 0 0 255\n")
    xyz, _ = read_pcd(tmp_path / "b.pcd")
    assert xyz.tolist() == [[0, 0, 0], [1, 0, 0]]
    shape = load_shape(tmp_path / "b.pcd")
    assert torch.allclose(shape.vertices, torch.tensor([[-1.0, 0, 0], [1.0, 0, 0]]))
    assert torch.allclose(shape.to_original(shape.vertices), torch.tensor([[0.0, 0, 0], [1.0, 0, 0]]))
    (tmp_path / "c.xyz").write_text("0 0 0\n")
    with pytest.raises(ValueError, match="one location"):
        load_shape(tmp_path / "c.xyz")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_shape(tmp_path / "d.foo")


@needs_data
def test_keypointnet_reader_real_data():
    ds = KeypointNetDataset(KPN)
    assert len(ds) == 11 and ds.skipped["no_pcd"] == 1022 + 999 - 11
    chair = KeypointNetDataset(KPN, categories=["chair"])[0]
    assert chair.is_mesh and chair.category == "chair" and chair.class_id == "03001627"
    pcd, _ = read_pcd(chair.extra["pcd_path"])
    # Keypoints normalised with the mesh's transform map back onto their pcd points.
    idx = chair.extra["pcd_indices"]
    assert np.allclose(chair.to_original(chair.keypoints).numpy(), pcd[idx], atol=1e-5)
    assert chair.vertices.norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    plane = KeypointNetDataset(KPN, categories=["02691156"], use_mesh=False, limit=1)[0]
    assert not plane.is_mesh and plane.vertices.shape == (2048, 3)
    assert "nose of the airplane" in plane.keypoint_names
    names = KeypointNetNamer(str(KPN / "semantic_names.json"))(chair, torch.zeros(1, 2, 2, 3))
    assert names.instances[names.names.index("lower end of the front leg of the chair")] == 4
    with pytest.raises(ValueError, match="unknown KeypointNet categories"):
        KeypointNetDataset(KPN, categories=["spaceship"])
