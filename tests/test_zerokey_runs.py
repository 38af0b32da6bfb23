"""Runs that fail loudly and never lose results: ``python -m zerokey predict`` against a local
OpenAI-compatible stub server (127.0.0.1) that is down, breaks mid-run, or answers without names."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import trimesh
import yaml

from zerokey.__main__ import main
from zerokey.cluster import ClusterConfig
from zerokey.data import load_shape
from zerokey.mllm.namers import StaticNamer
from zerokey.mllm.pointers import OpenAIPointer
from zerokey.mllm.testing import FakeChatServer, MolmoStub
from zerokey.pipeline import ZeroKeyPipeline
from zerokey.views import ViewConfig


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _box(path: Path, extents=(2.0, 1.0, 0.5)) -> Path:
    trimesh.creation.box(extents=extents).export(path)
    return path


def _centre(image, name):
    return [(50.0, 50.0)]  # an uninformative pointer: the image centre, every time


def _config(tmp_path: Path, run_dir: Path, inputs: Path, base_url: str, namer: dict | None = None) -> Path:
    config = {
        "seed_everything": 0,
        "return_predictions": False,
        "trainer": {
            "default_root_dir": str(run_dir),
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "zerokey.writer.KeypointJSONWriter"}],
        },
        "model": {
            "namer": namer
            or {"class_path": "zerokey.mllm.namers.StaticNamer", "init_args": {"names": ["corner"]}},
            "pointer": {
                "class_path": "zerokey.mllm.pointers.OpenAIPointer",
                "init_args": {
                    "base_url": base_url,
                    "model": "molmo",
                    "api_key_env": None,
                    "max_retries": 0,
                    "timeout": 10,
                    "max_workers": 1,  # deterministic counts (the pool size is tested elsewhere)
                },
            },
            "views": {"n_views": 6, "image_size": 64},
        },
        "data": {"inputs": [str(inputs)]},
    }
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def c_error(run_dir: Path) -> str:
    return json.loads((run_dir / "c.json").read_text())["error"]


def _predict(config: Path) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        main(["predict", "--config", str(config)])
    except SystemExit as err:
        return int(err.code or 0), time.perf_counter() - start
    return 0, time.perf_counter() - start


@pytest.fixture
def first_run(tmp_path):
    """One good run over two boxes; returns (run folder, inputs folder, snapshot of the run folder)."""
    inputs = tmp_path / "shapes"
    inputs.mkdir()
    _box(inputs / "a.obj"), _box(inputs / "b.obj", (1.0, 1.0, 1.0))
    run_dir = tmp_path / "run"
    with FakeChatServer(MolmoStub(_centre)) as server:
        code, _ = _predict(_config(tmp_path, run_dir, inputs, server.base_url))
        assert code == 0 and len(server.requests) == 1 + 2 * 6  # pre-flight + views x names per shape
    records = [json.loads((run_dir / f"{n}.json").read_text()) for n in "ab"]
    assert all(r["status"] == "complete" for r in records)
    return run_dir, inputs, _snapshot(run_dir)


def test_server_down_exits_nonzero_within_a_minute_and_keeps_earlier_predictions(tmp_path, first_run, capsys):
    run_dir, inputs, before = first_run
    _box(inputs / "c.obj", (0.5, 1.0, 2.0))  # a new shape that would be predicted
    capsys.readouterr()
    code, seconds = _predict(_config(tmp_path, run_dir, inputs, _closed_port_url()))
    err = capsys.readouterr().err
    assert code == 2 and seconds < 60
    assert "zerokey: error: pointer OpenAIPointer is not usable: server check failed" in err
    assert _snapshot(run_dir) == before  # byte for byte, run.json and config.yaml included


def test_server_failing_mid_run_stops_on_the_budget_and_lists_the_failed_shape(tmp_path, first_run, capsys):
    run_dir, inputs, before = first_run
    _box(inputs / "c.obj", (0.5, 1.0, 2.0))
    capsys.readouterr()
    # The pre-flight (text only) succeeds, every request with an image gets HTTP 500.
    with FakeChatServer(MolmoStub(_centre, fail_images=500)) as server:
        code, seconds = _predict(_config(tmp_path, run_dir, inputs, server.base_url))
        sent = len(server.requests)
    captured = capsys.readouterr()
    assert code == 2 and seconds < 60
    assert "stopping: 3 of 3 MLLM calls failed (budget 2%)" in captured.err
    # a and b were complete: skipped, untouched. c: 3 failed calls, the other 3 never sent.
    assert sent == 1 + 3 and "3 of 6 pointer requests failed, 3 not sent" in c_error(run_dir)
    after = _snapshot(run_dir)
    assert after["a.json"] == before["a.json"] and after["b.json"] == before["b.json"]
    c = json.loads(after["c.json"])
    assert c["status"] == "failed" and "pointer requests failed" in c["error"]
    summary = json.loads(after["summary_rank0.json"])
    assert summary["status"] == "aborted" and [s["shape_id"] for s in summary["failed_shapes"]] == ["c"]
    assert summary["shapes_skipped_complete_before"] == 2 and summary["mllm_failed_calls"]["pointer"] == 3
    assert json.loads(after["run.json"])["status"] == "aborted"
    assert "1 failed" in captured.out  # the end-of-run lines are printed on abort too

    # The server is back: a resume predicts only the failed shape.
    with FakeChatServer(MolmoStub(_centre)) as server:
        code, _ = _predict(_config(tmp_path, run_dir, inputs, server.base_url))
        assert code == 0 and len(server.requests) == 1 + 6
    assert json.loads((run_dir / "c.json").read_text())["status"] == "complete"
    assert (run_dir / "a.json").read_bytes() == before["a.json"]


def test_namer_without_names_is_a_failed_shape_not_zero_keypoints(tmp_path, capsys):
    inputs = tmp_path / "shapes"
    inputs.mkdir()
    _box(inputs / "a.obj")
    run_dir = tmp_path / "run"

    def answer(request):
        return "I like turtles" if "salient" in request.text else "OK"

    with FakeChatServer(answer) as server:
        namer = {
            "class_path": "zerokey.mllm.namers.OpenAINamer",
            "init_args": {"base_url": server.base_url, "model": "gpt", "api_key_env": None, "max_retries": 0},
        }
        code, _ = _predict(_config(tmp_path, run_dir, inputs, server.base_url, namer))
    captured = capsys.readouterr()
    # no shape completed: a failed run (exit 2, run.json says so), not "finished"
    assert code == 2 and "zerokey: error: run failed: no shape completed: 1 of 1" in captured.err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    record = json.loads((run_dir / "a.json").read_text())
    assert record["status"] == "failed" and "no names" in record["error"]
    summary = json.loads((run_dir / "summary_rank0.json").read_text())
    assert summary["shapes_done"] == 0 and [s["shape_id"] for s in summary["failed_shapes"]] == ["a"]
    assert "0 done, 0 skipped (complete before), 1 failed" in captured.out


def test_refuse_and_overwrite(tmp_path, first_run):
    run_dir, inputs, before = first_run
    with FakeChatServer(MolmoStub(_centre)) as server:
        config = yaml.safe_load(_config(tmp_path, run_dir, inputs, server.base_url).read_text())
        config["trainer"]["callbacks"][0]["init_args"] = {"on_existing": "refuse"}
        path = tmp_path / "refuse.yaml"
        path.write_text(yaml.safe_dump(config))
        assert _predict(path)[0] == 2
        assert _snapshot(run_dir) == before
        config["trainer"]["callbacks"][0]["init_args"] = {"on_existing": "overwrite"}
        config["model"]["patch_size"] = 3  # other settings are fine when told to overwrite
        path.write_text(yaml.safe_dump(config))
        assert _predict(path)[0] == 0
    old_id = json.loads(before["run.json"])["run_id"]
    new = json.loads((run_dir / "run.json").read_text())
    assert new["run_id"] != old_id and new["settings"]["module"]["patch_size"] == 3
    assert json.loads((run_dir / "a.json").read_text())["run_id"] == new["run_id"]


def test_uninformative_pointer_keypoint_shows_its_single_view_support(tmp_path):
    """The paper's clustering turns a pointer that always answers the image centre into a keypoint;
    its record shows that it rests on one detection in one view (25 candidates = one 5x5 patch)."""
    shape = load_shape(_box(tmp_path / "box.obj"), category="box")
    with FakeChatServer(MolmoStub(_centre)) as server:
        pointer = OpenAIPointer(server.base_url, "molmo", api_key_env=None)
        paper = ZeroKeyPipeline(StaticNamer(["corner"]), pointer, ViewConfig(image_size=64))
        record = paper.predict(shape).record
        views = paper.render(shape)
        points = pointer(shape, ["corner"], views)
    assert len(points) == 26  # one answer per view
    (kp,) = record["keypoints"]
    assert kp["support"]["views"] == 1 and kp["support"]["candidates"] == 25
    # With the min_views option (ours) the single-view blobs go; what is left is diffuse (spread
    # > 0.2 of the unit sphere), again visible in the record.
    strict = ZeroKeyPipeline(
        StaticNamer(["corner"]), pointer, ViewConfig(image_size=64), cluster=ClusterConfig(min_views=3)
    )
    (kp,) = strict.predict(shape, views=views, points=points).record["keypoints"]
    assert kp["support"]["views"] >= 3 and kp["support"]["spread"] > 0.2


def _two_boxes_against(tmp_path: Path, answer, max_failed_call_fraction: float) -> tuple[Path, int]:
    """Predict two boxes against a stub server answering ``answer``; (run folder, exit status)."""
    inputs = tmp_path / "shapes"
    inputs.mkdir()
    _box(inputs / "a.obj"), _box(inputs / "b.obj", (1.0, 1.0, 1.0))
    run_dir = tmp_path / "run"
    with FakeChatServer(answer) as server:
        config = _config(tmp_path, run_dir, inputs, server.base_url)
        data = yaml.safe_load(config.read_text())
        data["model"]["max_failed_call_fraction"] = max_failed_call_fraction
        config.write_text(yaml.safe_dump(data))
        code, _ = _predict(config)
    return run_dir, code


def test_two_shapes_whose_every_mllm_call_failed_is_a_failed_run(tmp_path, capsys):
    """Every image request answers HTTP 500: 2 x 6 failed calls, far under the 100-call floor of the
    in-run rule, yet the run must not end "finished" with exit 0."""
    # the in-run rule never stops it: 12 failures < 0.5 x 100
    run_dir, code = _two_boxes_against(tmp_path, MolmoStub(_centre, fail_images=500), 0.5)
    captured = capsys.readouterr()
    assert code == 2 and "run failed: no shape completed: 2 of 2 predicted shapes failed" in captured.err
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "failed" and "no shape completed" in manifest["reason"]


def test_small_run_over_the_end_budget_fails_with_one_good_shape(tmp_path, capsys):
    """One shape answered, one not: 6 of 12 calls failed. The in-run rule (2 % of max(calls, 100))
    lets it go to the end; the end rule (max(2 % of 12, 1) failed calls) marks it failed."""
    seen: list[int] = []
    stub = MolmoStub(_centre)

    def answer(request):
        if request.images:
            seen.append(1)
        return 500 if len(seen) > 6 else stub(request)  # the second shape's six views fail

    run_dir, code = _two_boxes_against(tmp_path, answer, 0.1)  # in-run: stops after 10 failures
    captured = capsys.readouterr()
    assert code == 2 and "run failed: 6 of 12 MLLM calls failed, over the budget" in captured.err
    summary = json.loads((run_dir / "summary_rank0.json").read_text())
    assert summary["shapes_done"] == 1 and summary["shapes_failed"] == 1
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
