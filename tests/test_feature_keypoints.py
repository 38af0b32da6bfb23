"""PatchAlign3D-feature keypoint detectors (zerokey.features.pipeline) on the real KeypointNet shapes.

The encoder is a tiny random one exported through the public export path: these tests pin the
machinery (frames, output format, evaluation, call counts), not accuracy, except where the answer is
known exactly (a support shape queried with its own prototypes finds its own annotated points).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.tools.export import export_checkpoint
from zerokey.data import KeypointNetDataset, load_keypointnet_annotations
from zerokey.evaluate import evaluate_predictions
from zerokey.features.pipeline import (
    FewShotFeatureKeypoints,
    UnifiedKeypoints,
    ZeroShotFeatureKeypoints,
    surface_points,
    visible_views,
)
from zerokey.mllm.namers import KeypointNetNamer
from zerokey.mllm.pointers import OraclePointer
from zerokey.pipeline import ZeroKeyPipeline
from zerokey.views import ViewConfig, make_cameras, render_shape

AIRPLANES = ["1b300fd9ad4050e6301fa0a0663ee996", "1d6afc44b053ab07941d71475449eb25"]


def _tiny_export(root: Path, text_encoder: str | None = "demo", head_dim: int = 384) -> Path:
    cfg = EncoderConfig.tiny(head_dim)
    torch.manual_seed(0)
    enc = PatchAlignEncoder(cfg)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    hp = {"encoder_config": cfg.to_dict(), "text_encoder": text_encoder}
    torch.save({"state_dict": state, "hyper_parameters": hp, "epoch": 0, "global_step": 0}, root / "t.ckpt")
    return export_checkpoint(root / "t.ckpt", root / "export")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_export(tmp_path_factory.mktemp("fk"))


@pytest.fixture(scope="module")
def airplanes(shared_data: Path) -> KeypointNetDataset:
    return KeypointNetDataset(shared_data / "keypointnet", ["airplane"], model_ids=AIRPLANES, use_mesh=False)


def _evaluate(records: list[dict], shared_data: Path):
    ann = load_keypointnet_annotations([shared_data / "keypointnet/annotations/airplane.json"])
    return evaluate_predictions(records, ann, shared_data / "keypointnet/pcds", thresholds=[0.01, 0.1])


def test_few_shot_support_shape_finds_its_own_annotated_points(
    export_dir: Path, airplanes: KeypointNetDataset, shared_data: Path
) -> None:
    query = airplanes[0]
    det = FewShotFeatureKeypoints(
        str(export_dir),
        str(shared_data / "keypointnet"),
        shots=1,
        support_split=None,
        support_ids=[query.model_id],
        exclude_query=False,
    )
    record = det.predict(query).record
    gt = {int(i) for i in query.extra["pcd_indices"]}
    assert len(record["keypoints"]) == len(gt)
    result = _evaluate([record], shared_data)
    # every annotated point is found exactly: IoU 1 at the tightest threshold.
    assert result.at(0.01, "airplane") == pytest.approx(1.0)


def test_few_shot_leave_one_out_excludes_the_query(
    export_dir: Path, airplanes: KeypointNetDataset, shared_data: Path
):
    det = FewShotFeatureKeypoints(
        str(export_dir), str(shared_data / "keypointnet"), shots=3, support_split=None, exclude_query=True
    )
    q = airplanes[0]
    pool = det.support_pool(q.class_id)
    assert q.model_id in pool and len(pool) >= 4
    protos = det.prototypes(q.class_id, q.model_id, torch.device("cpu"))
    assert protos.n_shapes == 3
    record = det.predict(q).record
    assert record["counts"]["support_shapes"] == 3 and record["mllm_calls"] == {"namer": 0, "pointer": 0}
    assert _evaluate([record], shared_data).shapes == {"airplane": 1}


def test_zero_shot_writes_one_keypoint_per_named_instance_in_the_input_frame(
    export_dir: Path, airplanes: KeypointNetDataset, shared_data: Path
) -> None:
    det = ZeroShotFeatureKeypoints(
        str(export_dir), KeypointNetNamer(str(shared_data / "keypointnet/semantic_names.json"))
    )
    shape = airplanes[1]
    record = det.predict(shape).record
    n_expected = sum(record["instances"])
    assert len(record["keypoints"]) == n_expected > 0
    assert record["mllm_calls"]["pointer"] == 0
    # keypoints are points of the input cloud (snapped), written in the pcd's own frame
    pcd = shape.to_original(shape.vertices)
    for kp in record["keypoints"]:
        d = (pcd - torch.tensor(kp["xyz"])).norm(dim=-1).min()
        assert float(d) < 1e-4
    assert _evaluate([record], shared_data).shapes == {"airplane": 1}


def test_surface_points_lie_on_the_mesh_faces() -> None:
    from zerokey.data import ShapeSample

    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    s = ShapeSample("tri", "", v, torch.tensor([[0, 1, 2]]), torch.zeros(3), 1.0)
    p = surface_points(s, 500)
    assert p.shape == (500, 3) and torch.allclose(p[:, 2], torch.zeros(500))
    assert (p[:, :2] >= -1e-6).all() and (p[:, 0] + p[:, 1] <= 1 + 1e-6).all()


def test_visibility_matches_the_oracle_depth_test(airplanes: KeypointNetDataset) -> None:
    shape = airplanes[0]
    cfg = ViewConfig(image_size=96)
    views = render_shape(shape, make_cameras(cfg), cfg)
    vis = visible_views(shape.vertices[:50], views)
    assert vis.shape == (26, 50)
    # a point far behind the camera of view 0 is never visible in it; surface points are seen by some view
    assert vis.any(0).float().mean() > 0.9


def test_unified_asks_fewer_pointer_calls_than_full_zerokey(
    export_dir: Path, airplanes: KeypointNetDataset, shared_data: Path
) -> None:
    cfg = ViewConfig(image_size=128)
    oracle = OraclePointer(noise_px=0.0)
    unified = UnifiedKeypoints(
        str(export_dir),
        KeypointNetNamer(str(shared_data / "keypointnet/semantic_names.json")),
        oracle,
        views=cfg,
        views_per_name=3,
    )
    full = ZeroKeyPipeline(
        KeypointNetNamer(str(shared_data / "keypointnet/semantic_names.json")), oracle, cfg
    )
    shape = airplanes[0]
    u = unified.predict(shape).record
    f = full.predict(shape).record
    k = len(u["names"])
    assert u["mllm_calls"]["pointer_full_zerokey"] == 26 * k
    assert 0 < u["mllm_calls"]["pointer"] <= 3 * k < 26 * k
    assert all(len(v) <= 3 for v in u["pointer_views"].values())
    assert len(u["keypoints"]) >= 1
    result = _evaluate([u, f], shared_data)
    assert result.shapes == {"airplane": 2}


REPO = Path(__file__).resolve().parents[1]


def _cli_args(config: str, run_dir: Path, model: Path, kpn: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--config",
        str(REPO / "configs" / "keypoints" / config),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--model.detector.init_args.model",
        str(model),
        "--data.keypointnet_root",
        str(kpn),
        "--data.categories",
        '["airplane"]',
        "--data.model_ids",
        json.dumps(AIRPLANES),
        *extra,
    ]


@pytest.mark.parametrize(
    "config, extra",
    [
        ("zeroshot.yaml", []),
        ("fewshot.yaml", ["--model.detector.init_args.support_split", "null"]),
        ("unified.yaml", ["--model.detector.init_args.views.image_size", "96"]),
    ],
)
def test_configs_run_through_the_zerokey_cli_and_evaluate(
    config: str, extra: list[str], export_dir: Path, shared_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import json

    from zerokey.__main__ import main
    from zerokey.evaluate import load_prediction_dir

    monkeypatch.chdir(tmp_path)
    kpn = shared_data / "keypointnet"
    run = tmp_path / "run"
    main(_cli_args(config, run, export_dir, kpn, *extra))
    printed = capsys.readouterr().out
    assert "2 done, 0 skipped (complete before), 0 failed" in printed
    records = load_prediction_dir(run)
    assert len(records) == 2 and all(r["status"] == "complete" and r["keypoints"] for r in records)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "finished" and (run / "config.yaml").exists()
    # the configs name the KeypointNet root once (OmegaConf interpolation): the command line's
    # --data.keypointnet_root reached the detector / namer too
    assert "${" not in (run / "config.yaml").read_text() and str(kpn) in (run / "config.yaml").read_text()
    assert _evaluate(records, shared_data).shapes == {"airplane": 2}
    # a rerun resumes: nothing is predicted again and the files are untouched
    before = {p: p.read_bytes() for p in run.glob("02691156/*.json")}
    assert len(before) == 2
    main(_cli_args(config, run, export_dir, kpn, *extra))
    assert "0 done, 2 skipped" in capsys.readouterr().out
    assert all(p.read_bytes() == b for p, b in before.items())


def test_detector_with_a_missing_model_fails_before_the_first_shape(
    shared_data: Path, tmp_path: Path, monkeypatch
):
    from zerokey.__main__ import main

    monkeypatch.chdir(tmp_path)
    kpn = shared_data / "keypointnet"
    args = _cli_args("fewshot.yaml", tmp_path / "run", tmp_path / "nope", kpn)
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert not list((tmp_path / "run").rglob("02691156/*.json"))


def test_feature_bench_rows_count_calls_like_the_records(export_dir: Path, shared_data: Path) -> None:
    from zerokey.features.bench import feature_rows, format_rows

    rows = feature_rows(str(export_dir), shared_data / "keypointnet", shots=[1], image_size=64, limit=2)
    assert [r["row"] for r in rows] == [
        "patchalign zero-shot",
        "patchalign few-shot K=1",
        "unified (oracle)",
        "zerokey (oracle)",
    ]
    assert all(r["shapes"] == 2 for r in rows)
    assert rows[0]["mllm_calls_per_shape"] == rows[1]["mllm_calls_per_shape"] == 0
    full, unified = rows[3]["mllm_calls_per_shape"], rows[2]["mllm_calls_per_shape"]
    assert full % 26 == 0 and 0 < unified <= 3 * full / 26  # 3 views per name instead of 26
    assert "zerokey (oracle)" in format_rows(rows)


def test_bad_detector_settings_are_one_clear_error(shared_data: Path) -> None:
    namer = KeypointNetNamer(str(shared_data / "keypointnet/semantic_names.json"))
    with pytest.raises(ValueError, match=r"must be > 0: region_radius=0"):
        ZeroShotFeatureKeypoints("m", namer, region_radius=0)
    with pytest.raises(ValueError, match="score must be 'softmax' or 'cosine'"):
        ZeroShotFeatureKeypoints("m", namer, score="dot")
    with pytest.raises(ValueError, match=r"views_per_name=0"):
        UnifiedKeypoints("m", namer, OraclePointer(), views_per_name=0)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        FewShotFeatureKeypoints("m", str(shared_data / "keypointnet"), shots=0)


@pytest.mark.parametrize("support", [[], ["--model.detector.init_args.on_missing_support", "leave_one_out"]])
def test_fewshot_config_as_shipped_refuses_the_chair_and_runs_the_airplanes(
    support: list[str], export_dir: Path, shared_data: Path, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    """The shared data: 8 airplanes + the one chair in train.txt, 2 airplanes in test.txt. The chair
    has no support but itself (with or without the leave-one-out fallback): refused with one line,
    the airplanes run, and evaluate says the run covers 1 of the 2 classes."""
    from zerokey.__main__ import main
    from zerokey.evaluate import main as evaluate_main

    monkeypatch.chdir(tmp_path)
    kpn = shared_data / "keypointnet"
    run = tmp_path / "run"
    args = [
        "predict",
        "--config",
        str(REPO / "configs" / "keypoints" / "fewshot.yaml"),
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--model.detector.init_args.model",
        str(export_dir),
        "--data.keypointnet_root",
        str(kpn),
        *support,
    ]
    main(args)  # no exception: the run finished
    printed = capsys.readouterr().out
    assert "10 done, 0 skipped (complete before), 1 failed" in printed
    chair = json.loads((run / "03001627" / "88382b877be91b2a572f8e1c1caad99e.json").read_text())
    assert chair["status"] == "refused"
    assert "class chair (03001627) refused: no support shape" in chair["error"]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # one line per class
    planes = [json.loads(p.read_text()) for p in sorted((run / "02691156").glob("*.json"))]
    assert len(planes) == 10 and all(p["status"] == "complete" for p in planes)
    assert {p["counts"]["support_source"] for p in planes} == {"split train"}
    assert json.loads((run / "run.json").read_text())["status"] == "finished"

    result = evaluate_main(
        ["--pred", str(run), "--annotations", *map(str, sorted((kpn / "annotations").glob("*.json")))]
        + ["--pcd-root", str(kpn / "pcds")]
    )
    out = capsys.readouterr().out
    assert result.classes_asked == ["airplane", "chair"] and set(result.iou) == {"airplane"}
    assert "covers 1 of 2 classes asked for" in out and "chair: 1 shape(s) refused" in out


def test_fewshot_leave_one_out_fallback_is_announced_once(
    export_dir: Path, shared_data: Path, caplog, tmp_path: Path
) -> None:
    """Support from a split that holds none of the class: falls back to the other annotated shapes."""
    kpn = tmp_path / "kpn"
    kpn.mkdir()
    for sub in ("annotations", "pcds", "semantic_names.json"):
        (kpn / sub).symlink_to(shared_data / "keypointnet" / sub)
    (kpn / "splits").mkdir()
    (kpn / "splits" / "train.txt").write_text("")  # nothing in the train split
    det = FewShotFeatureKeypoints(str(export_dir), str(kpn), shots=2, on_missing_support="leave_one_out")
    ds = KeypointNetDataset(kpn, ["airplane"], model_ids=AIRPLANES, use_mesh=False)
    records = [det.predict(ds[i]).record for i in range(len(ds))]
    assert all(r["status"] == "complete" for r in records)
    assert {r["counts"]["support_source"] for r in records} == {"every annotated shape (leave-one-out)"}
    assert len([r for r in caplog.records if "falling back" in r.getMessage()]) == 1
    strict = FewShotFeatureKeypoints(str(export_dir), str(kpn), shots=2)
    refused = strict.predict(ds[0]).record
    assert refused["status"] == "refused" and "split train" in refused["error"]
