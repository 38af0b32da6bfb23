"""The tools' command lines on jsonargparse: the spellings users type today still parse, to the same values.

Each command is parsed with ``--print_config`` (jsonargparse prints what it parsed and exits 0, running
nothing), so every flag of the README, the Makefile and the old argparse parsers is checked cheaply.
"""

from __future__ import annotations

from typing import Literal

import pytest
import yaml

from patchalign.__main__ import main as patchalign_main
from patchalign.argv import jsonargparse_argv


def _typed(
    name: str,
    n_objects: int = 3,
    no_baseline: bool = False,
    seeds: list[int] = [0],  # noqa: B006
    arms: list[Literal["real teacher", "no Stage 1"]] | None = None,
    limit: int | None = None,
) -> None:
    """A function with each kind of parameter the tools have."""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["x", "--n-objects", "51"], ["x", "--n_objects", "51"]),
        (["x", "--n-objects=51"], ["x", "--n_objects=51"]),
        (["--no-baseline"], ["--no_baseline=true"]),
        (["--no_baseline", "false"], ["--no_baseline", "false"]),
        (["--no-baseline", "--limit", "-1"], ["--no_baseline=true", "--limit", "-1"]),
        (["--seeds", "0", "1", "--limit", "2"], ["--seeds=[0,1]", "--limit", "2"]),
        (["--seeds", "[0, 1]"], ["--seeds", "[0, 1]"]),
        (["--seeds", "-1", "2"], ["--seeds=[-1,2]"]),  # negative numbers are values, not options
        (["--arms", "real teacher", "no Stage 1"], ['--arms=["real teacher","no Stage 1"]']),
        (["--arms", "null"], ["--arms=null"]),
        (
            ["--n-object", "5", "--config", "c.yaml", "--help"],
            ["--n-object", "5", "--config", "c.yaml", "--help"],
        ),
    ],
)
def test_argparse_spellings_become_jsonargparse_ones(argv: list[str], expected: list[str]) -> None:
    # unknown options (a typo) pass through untouched, for jsonargparse to report
    assert jsonargparse_argv(_typed, argv) == expected


def _parsed(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    with pytest.raises(SystemExit) as e:
        patchalign_main([*argv, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["export", "a.ckpt", "out/", "--torch-export", "--num-points", "64", "--non-strict",
             "--overwrite"],
            {"ckpt": "a.ckpt", "out_dir": "out/", "torch_export": True, "num_points": 64, "non_strict": True,
             "overwrite": True},
        ),
        (
            ["demo", "--no-baseline", "--n-objects", "51", "--stage1-steps", "2", "--stage2-steps", "3",
             "--batch-size", "4", "--eval-limit", "6", "--teacher", "dinov2-random", "--shards", "s",
             "--out", "o", "--shapenetpart", "none"],
            {"no_baseline": True, "n_objects": 51, "stage1_steps": 2, "stage2_steps": 3, "batch_size": 4,
             "eval_limit": 6, "teacher": "dinov2-random", "shards": "s", "out": "o", "shapenetpart": "none"},
        ),
        (["demo"], {"no_baseline": False, "eval_limit": None, "stage1_steps": 100, "stage2_steps": 300}),
        (
            ["bench", "demo", "--seeds", "0", "1", "--arms", "random teacher", "no Stage 1",
             "--random-shards", "r", "--random-teacher", "dinov2-random:2", "--eval-limit", "4"],
            {"seeds": [0, 1], "arms": ["random teacher", "no Stage 1"], "random_shards": "r",
             "random_teacher": "dinov2-random:2", "eval_limit": 4},
        ),
        (
            ["bench", "encoder", "--batch-sizes", "1", "16", "64", "--dtype", "bfloat16", "--json"],
            {"batch_sizes": [1, 16, 64], "dtype": "bfloat16", "json": True, "device": None},
        ),
        (
            ["bench", "loader", "--workers", "1", "2", "--batch-sizes", "32", "256", "--batches", "3",
             "--compact-objects", "0", "--json", "r.json"],
            {"workers": [1, 2], "batch_sizes": [32, 256], "batches": 3, "compact_objects": 0,
             "json": "r.json"},
        ),
        (
            ["bench", "train", "--batch-sizes", "32", "256", "--workers", "2", "--precision", "bf16",
             "--model-max-batch", "4", "--stream-objects", "8"],
            {"batch_sizes": [32, 256], "workers": 2, "precision": "bf16", "model_max_batch": 4,
             "stream_objects": 8},
        ),
        (
            ["bench", "render", "--image-size", "448", "--layout", "zerokey", "--points", "0",
             "--no-pytorch3d-cpu", "--threads", "2"],
            {"image_size": 448, "layout": "zerokey", "points": 0, "no_pytorch3d_cpu": True, "threads": 2},
        ),
        (
            ["bench", "eval", "--shapes", "10", "--batch-size", "4", "--num-workers", "0", "--amp"],
            {"shapes": 10, "batch_size": 4, "num_workers": 0, "amp": True},
        ),
        (
            ["bench", "gpu", "--cpu-smoke", "--only", "imports", "render", "zerokey", "--budget-s", "60"],
            {"cpu_smoke": True, "only": ["imports", "render", "zerokey"], "budget_s": 60.0, "json": None},
        ),
    ],
    ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None,
)  # fmt: skip
def test_todays_command_lines_parse_to_the_same_values(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: dict
) -> None:
    parsed = _parsed(capsys, argv)
    assert {k: parsed[k] for k in expected} == expected


def test_viz_command_line_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from patchalign.tools.viz import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--input", "chair.obj", "--parts", "back,seat", "--text-bank", "b.safetensors",
              "--num-points", "100", "--assign", "knn", "--print_config"])  # fmt: skip
    assert e.value.code == 0
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["parts"] == "back,seat" and parsed["num_points"] == 100 and parsed["assign"] == "knn"
    assert parsed["text_bank"] == "b.safetensors" and parsed["out"] == "viz"


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "gpu", "--only", "bogus"],
        ["bench", "encoder", "--dtype", "float64"],
        ["demo", "--n-objects", "many"],
        ["demo", "--no-basline"],
        ["export", "only-one-positional"],
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Issue 19 item 8: a misspelled option or a bad value is one line, not the usage text."""
    assert patchalign_main(argv) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and line.endswith("--help lists the options)") and not captured.out


def test_help_names_every_option_and_the_spelling_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        patchalign_main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--no_baseline" in out and "skip the no-Stage-1 baseline" in out and "with dashes" in out


def _scaled(count: int, factor: float = 2.0, strict: bool = False) -> int:
    """A typed command for cli_main.

    Args:
        count: how many.
        factor: the scale.
        strict: refuse a zero count.
    """
    if strict and count == 0:
        raise ValueError("count is zero")
    print(count * factor)
    return 3


def test_cli_main_is_run_cli_under_one_name(capsys: pytest.CaptureFixture[str]) -> None:
    """cli_main(fn, prog) -> main(argv): fn's own status, 2 for a bad option (named with prog), 1 for
    an expected error (one line), both spellings; every bench module's main is one."""
    from patchalign.argv import cli_main
    from patchalign.tools.bench import loader

    main = cli_main(_scaled, "python -m demo scaled", errors=(ValueError,))
    assert main(["4", "--factor", "0.5"]) == 3 and capsys.readouterr().out.strip() == "2.0"
    assert main(["0", "--strict"]) == 1 and capsys.readouterr().err.strip() == "error: count is zero"
    assert main(["4", "--nope", "1"]) == 2
    assert "python -m demo scaled --help" in capsys.readouterr().err
    assert "python -m demo scaled" in (main.__doc__ or "")
    assert loader.main(["--nope", "1"]) == 2
    assert "python -m patchalign bench loader --help" in capsys.readouterr().err
