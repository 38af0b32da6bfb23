"""``python -m patchalign fit|validate|test`` with explicit checkpoints, moved runs and earlier results.

Every run is a tiny model on synthetic shards (a few steps on CPU) through the real LightningCLI,
driven by the shipped configs. Expectations are independent of the code path under test: the
checkpoint files' own tensors and step counters, file bytes before and after, and for ``test`` the
numbers of the other loading route (``init_from``) on the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT as REPO
from conftest import save_lightning_checkpoint, write_tiny_stage_config
from test_eval_configs import make_fixture

from patchalign.__main__ import main as patchalign_main
from patchalign.checkpoints import safe_torch_load
from patchalign.data.synthetic import write_synthetic_shards, write_synthetic_text_bank
from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.training.cli import cli_main

TINY = {"num_groups": 16, "group_size": 8, "encoder_dims": 32, "trans_dim": 32, "depth": 2, "num_heads": 2}
TEXT_DIM = 384  # the demo text encoder's width, so a Stage 2 checkpoint can be evaluated with it


def _stage_config(tmp: Path, stage: int, data: dict[str, Path], root: Path, **model_args: object) -> Path:
    files = {"data_path": str(data["train"]), "val_path": str(data["val"]), "text_bank": str(data["bank"])}
    return write_tiny_stage_config(
        tmp / f"stage{stage}_{root.name}.yaml", stage, root, TINY, files, **model_args
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Stage 1 run and a Stage 2 run from it (4 steps each), with their configs."""
    tmp = tmp_path_factory.mktemp("cli_ckpt")
    data = {
        "train": write_synthetic_shards(tmp / "train", [4, 4], num_points=2048, feature_dim=12),
        "val": write_synthetic_shards(tmp / "val", [2], num_points=2048, feature_dim=12, uid_prefix="v"),
        "bank": write_synthetic_text_bank(tmp / "bank384.safetensors", dim=TEXT_DIM),
    }
    cfg1 = _stage_config(tmp, 1, data, tmp / "run1")
    cli_main(["fit", "--config", str(cfg1)])
    last1 = tmp / "run1" / "checkpoints" / "last.ckpt"
    cfg2 = _stage_config(tmp, 2, data, tmp / "run2", init_from=str(last1), freeze_blocks=1)
    cli_main(["fit", "--config", str(cfg2)])
    return {
        "tmp": tmp,
        "cfg1": cfg1,
        "cfg2": cfg2,
        "last1": last1,
        "last2": tmp / "run2" / "checkpoints" / "last.ckpt",
    }


def _encoder_state(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = safe_torch_load(ckpt)["state_dict"]
    return {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}


@pytest.mark.parametrize("stage", [1, 2])
def test_fit_and_validate_take_an_explicit_lightning_checkpoint(runs: dict[str, Path], stage: int) -> None:
    """Before: ``__init__() got an unexpected keyword argument 'encoder_config'`` (Lightning 2.6
    fed the saved hyper-parameters back into the model config)."""
    ckpt, cfg = runs[f"last{stage}"], runs[f"cfg{stage}"]
    root = runs["tmp"] / f"resumed{stage}"
    cli = cli_main(["fit", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.max_steps", "6",
                    "--trainer.default_root_dir", str(root)])  # fmt: skip
    assert cli.trainer.ckpt_path == str(ckpt)  # restored from the file (trainer state included)
    assert cli.trainer.global_step == 6
    assert (root / "checkpoints" / "last.ckpt").is_file()  # written under the new root

    val = cli_main(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt),
                    "--trainer.default_root_dir", str(runs["tmp"] / f"val{stage}")])  # fmt: skip
    for name, tensor in _encoder_state(ckpt).items():  # the file's weights, not a fresh model's
        torch.testing.assert_close(val.model.encoder.state_dict()[name], tensor, msg=name)
    assert "val/loss" in val.trainer.callback_metrics


def test_test_takes_an_explicit_stage2_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    """``test --config configs/eval/faust.yaml --ckpt_path stage2.ckpt`` (no encoder overrides) gives
    the numbers of the ``init_from`` route on the same file."""
    root = make_fixture("faust", tmp_path / "data", None)
    common = ["--config", str(REPO / "configs" / "eval" / "faust.yaml"), "--data.init_args.root", str(root),
              "--data.init_args.num_workers", "0", "--model.init_args.eval_text_encoder", "demo",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    by_ckpt = cli_main(["test", *common, "--ckpt_path", str(runs["last2"]),
                        "--trainer.default_root_dir", str(tmp_path / "a")])  # fmt: skip
    for name, tensor in _encoder_state(runs["last2"]).items():
        torch.testing.assert_close(by_ckpt.model.encoder.state_dict()[name], tensor, msg=name)
    by_init = cli_main(["test", *common, "--model.init_args.init_from", str(runs["last2"]),
                        "--trainer.default_root_dir", str(tmp_path / "b")])  # fmt: skip
    a = json.loads((tmp_path / "a" / "eval" / "results.json").read_text())["scalars"]
    b = json.loads((tmp_path / "b" / "eval" / "results.json").read_text())["scalars"]
    assert a and a == pytest.approx(b)
    assert by_init.model.encoder.config.trans_dim == TINY["trans_dim"]  # read from the checkpoint


def test_stage1_test_on_shards_is_one_line(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """Shard sets have no test split: one line, exit status 2 (not a Lightning traceback)."""
    rc = patchalign_main(["test", "--config", str(runs["cfg1"]), "--ckpt_path", str(runs["last1"]),
                          "--trainer.default_root_dir", str(runs["tmp"] / "t1")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "test_dataloader" in err[0], err


def test_a_moved_run_never_writes_into_the_original(
    runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """``fit --config <run>/config.yaml --ckpt_path ... --trainer.default_root_dir NEW`` writes only
    under NEW (before: the saved config pinned the old run's checkpoint dirpath)."""
    tmp = runs["tmp"]
    saved = next((tmp / "run1").rglob("config.yaml"))
    cb = next(
        c
        for c in yaml.safe_load(saved.read_text())["trainer"]["callbacks"]
        if "ModelCheckpoint" in c["class_path"]
    )
    assert cb["init_args"]["dirpath"] is None  # the saved config does not pin a derived dirpath
    before = {p: p.read_bytes() for p in (tmp / "run1" / "checkpoints").iterdir()}

    new = tmp / "moved"
    moved = cli_main(["fit", "--config", str(saved), "--ckpt_path", str(runs["last1"]),
                      "--trainer.default_root_dir", str(new), "--trainer.max_steps", "6"])  # fmt: skip
    assert moved.trainer.ckpt_path == str(runs["last1"]) and moved.trainer.global_step == 6
    assert (new / "checkpoints" / "last.ckpt").is_file()
    cli_main(["fit", "--config", str(saved), "--ckpt_path", "last",
              "--trainer.default_root_dir", str(tmp / "moved_last"), "--trainer.max_steps", "1"])  # fmt: skip
    assert (tmp / "moved_last" / "checkpoints" / "last.ckpt").is_file()
    assert {p: p.read_bytes() for p in (tmp / "run1" / "checkpoints").iterdir()} == before

    # A config saved before this fix pins <old root>/checkpoints: refused in one line.
    old = yaml.safe_load(saved.read_text())
    for c in old["trainer"]["callbacks"]:
        if "ModelCheckpoint" in c["class_path"]:
            c["init_args"]["dirpath"] = str(tmp / "run1" / "checkpoints")
    pinned = tmp / "pinned.yaml"
    pinned.write_text(yaml.safe_dump(old))
    capsys.readouterr()
    rc = patchalign_main(["fit", "--config", str(pinned), "--ckpt_path", "last",
                          "--trainer.default_root_dir", str(tmp / "moved2")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "checkpoints folder of another run" in err[0], err
    assert {p: p.read_bytes() for p in (tmp / "run1" / "checkpoints").iterdir()} == before


@pytest.fixture(scope="module")
def odd_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EncoderConfig]:
    """A tiny export whose architecture is not the eval configs' (widths, depth, heads, groups)."""
    from patchalign.tools.export import export_checkpoint

    d = tmp_path_factory.mktemp("odd_export")
    cfg = EncoderConfig(num_groups=24, group_size=8, encoder_dims=40, trans_dim=48, depth=3, num_heads=4,
                        head_dim=TEXT_DIM, drop_path_rate=0.0)  # fmt: skip
    torch.manual_seed(0)
    save_lightning_checkpoint(d / "m.ckpt", PatchAlignEncoder(cfg))
    export_checkpoint(d / "m.ckpt", d / "model")
    return d / "model", cfg


def test_eval_reads_the_architecture_and_refuses_to_overwrite_results(
    odd_export: tuple[Path, EncoderConfig], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Item 7: no ``--model.init_args.encoder.init_args.config`` overrides for another architecture.
    Item 4: ``test`` into a folder holding an earlier evaluation is refused unless ``--overwrite``."""
    export, cfg = odd_export
    out = tmp_path / "run"
    args = ["test", "--config", str(REPO / "configs" / "eval" / "faust.yaml"),
            "--data.init_args.root", str(make_fixture("faust", tmp_path / "data", None)),
            "--data.init_args.num_workers", "0", "--model.init_args.init_from", str(export),
            "--model.init_args.eval_text_encoder", "demo", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out)]  # fmt: skip
    cli = cli_main(args)
    assert cli.model.encoder.config.to_dict() == {**cfg.to_dict(), "drop_path_rate": 0.1}  # config's dropout
    assert "architecture from" in capsys.readouterr().out  # the replacement is said, not silent
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "eval" / "results.json" in written and out / "config.yaml" in written

    assert patchalign_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds an evaluation" in err[0] and "--overwrite" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written  # nothing touched

    (out / "eval" / "stale.png").write_bytes(b"old picture")
    assert patchalign_main([*args, "--overwrite"]) == 0
    assert not (out / "eval" / "stale.png").exists()  # the earlier evaluation was replaced as a whole
    assert (out / "eval" / "results.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is False  # never saved as true


def test_bad_inputs_are_one_line(tmp_path: Path, odd_export: tuple[Path, EncoderConfig], capsys) -> None:  # noqa: ANN001
    """A missing benchmark root, a misspelled key, missing files: one line on stderr, status 2; and no
    "LightningCLI's args parameter" warning on any command."""
    import warnings

    export, _ = odd_export
    snp = ["test", "--config", str(REPO / "configs" / "eval" / "shapenetpart.yaml"),
           "--trainer.default_root_dir", str(tmp_path / "e")]  # fmt: skip
    cases = {
        "benchmark root /nope: no such file or directory": [
            *snp, "--model.init_args.init_from", str(export), "--data.init_args.root", "/nope"],
        "Option 'rooot' is not accepted (did you mean 'root'?)": [*snp, "--data.init_args.rooot", "/nope"],
        "model.init_args.init_from /nope.pt: no such file or directory": [
            *snp, "--model.init_args.init_from", "/nope.pt"],
        "--ckpt_path /nope.ckpt: no such file or directory": [
            "validate", "--config", str(REPO / "configs" / "stage2.yaml"), "--ckpt_path", "/nope.ckpt"],
        "evaluates a benchmark with `test`, not `validate`": [
            "validate", "--config", str(REPO / "configs" / "eval" / "faust.yaml"),
            "--model.init_args.init_from", str(export),
            "--data.init_args.root", str(make_fixture("faust", tmp_path / "faust", None)),
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "v")],
        "holds weights only (export), no training state to resume": [
            "fit", "--config", str(REPO / "configs" / "stage2.yaml"), "--ckpt_path", str(export)],
        "Option 'trainabel' is not accepted (did you mean 'trainable'?)": [
            "fit", "--config", str(REPO / "configs" / "stage2.yaml"), "--model.init_args.trainabel", "all"],
        "--weights_only false would unpickle arbitrary code": [
            "validate", "--config", str(REPO / "configs" / "stage2.yaml"),
            "--ckpt_path", str(export / "config.json"), "--weights_only", "false"],
        "--ckpt_path https://example.org/x.ckpt: must be a local file": [
            "validate", "--config", str(REPO / "configs" / "stage2.yaml"), "--ckpt_path", "https://example.org/x.ckpt"],
    }  # fmt: skip
    for expected, argv in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SystemExit) if "Option" in expected else _no_raise():
                rc = patchalign_main(argv)
                assert rc == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (expected, err)
        assert "Traceback" not in captured.out and "usage:" not in captured.err
        assert not [w for w in caught if "args parameter" in str(w.message)]


class _no_raise:  # noqa: N801 - a context manager used like pytest.raises
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False
