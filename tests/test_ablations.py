"""The paper's four ablation tables as configs (``configs/ablations/``): every row builds and fits.

Each config runs unmodified apart from size (a narrow 12-block encoder, 256 points, one step, CPU)
inside a temporary project folder, so its relative paths (shards, text banks, the Stage 1 run it
starts from) resolve to tiny random stand-ins written there: synthetic shards with a distinct
teacher width per teacher row, random text banks with a distinct width per text-encoder row, and a
reference Stage 1 fitted from ``configs/reference/stage1.yaml`` itself. What each row changes is
checked against the paper's table as typed below, not against the configs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT

from patchalign.data.synthetic import DEFAULT_PARTS, write_synthetic_shards
from patchalign.data.textbank import save_text_bank
from patchalign.eval.references import ABLATION_ROWS, ABLATION_TABLES
from patchalign.training.cli import cli_main

ABLATIONS = REPO_ROOT / "configs" / "ablations"
DEPTH = 12  # the reference depth: freeze_blocks in the configs are absolute block counts
NARROW = {"num_groups": 16, "group_size": 8, "encoder_dims": 32, "trans_dim": 32, "num_heads": 2}
FEATURE_DIM = 12  # the stand-in DINOv2 features
TEXT_DIM = 8  # the stand-in OpenCLIP bank of the synthetic shards

#: the issue's / paper's rows (ShapeNetPart mIoU as the talk prints it; None: paper appendix only)
TALK_MIOU = {
    "strategy": {"stage2_only": 50.5, "joint": 50.2, "two_stage": 56.9},
    "text_encoder": {"siglip": 46.4, "gemma2_9b_it": 54.8, "openclip_bigg": 56.9},
    "teacher": {"dinov3": 46.5, "openclip_bigg_vision": 49.3, "dinov1": 51.8, "dinov2": 56.9},
    "freezing": {"full": 49.4, "last2": 55.7, "last3": None, "last1": 56.9, "frozen_encoder": None},
}
#: stand-in widths, all different, so a linked head width names the file it came from
TEACHER_DIM = {"dinov1": 20, "dinov3": 24, "openclip_bigg_vision": 28}
TEXT_BANK_DIM = {"siglip": 6, "gemma2_9b_it": 10}
TEXT_SPEC = {"siglip": "hf:google/siglip-base-patch16-224", "gemma2_9b_it": "hf:google/gemma-2-9b-it"}
#: what trains in each Stage 2 row: encoder blocks (of 12), from the paper's table and captions
TRAINED_BLOCKS = {
    "stage2_only": set(range(DEPTH)),
    "joint": set(range(DEPTH)),
    "full": set(range(DEPTH)),
    "last2": {10, 11},
    "last3": {9, 10, 11},
    "frozen_encoder": set(),
}
FROM_SCRATCH = {"stage2_only", "joint"}


def _size_args(root: Path) -> list[str]:
    trainer = {
        "accelerator": "cpu", "devices": "1", "precision": "32-true", "max_steps": "1", "max_epochs": "1",
        "limit_val_batches": "0", "enable_progress_bar": "false", "enable_model_summary": "false",
        "logger": "false", "default_root_dir": str(root),
    }  # fmt: skip
    data = {"num_workers": "0", "batch_size": "4", "num_points": "256", "pin_memory": "false"}
    args = [t for k, v in trainer.items() for t in (f"--trainer.{k}", v)]
    args += [t for k, v in data.items() for t in (f"--data.init_args.{k}", v)]
    args += [
        t for k, v in NARROW.items() for t in (f"--model.init_args.encoder.init_args.config.{k}", str(v))
    ]
    return [*args, "--model.init_args.optim.global_batch_size", "4"]


def _fit(config: Path) -> object:
    """``fit --config config`` at stand-in size into the config's own (relative) run folder."""
    root = yaml.safe_load(config.read_text())["trainer"]["default_root_dir"]
    return cli_main(["fit", "--config", str(config), *_size_args(Path(root))])


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with the stand-ins every ablation config names by relative path."""
    root = tmp_path_factory.mktemp("ablations")
    for name, dim in [("find3d", FEATURE_DIM), *((f"find3d_{k}", d) for k, d in TEACHER_DIM.items())]:
        write_synthetic_shards(root / "shards" / name / "train", [6, 6], num_points=2048, feature_dim=dim)
        write_synthetic_shards(
            root / "shards" / name / "val", [4], num_points=2048, feature_dim=dim, uid_prefix="val"
        )
    g = torch.Generator().manual_seed(1)
    for key, dim in TEXT_BANK_DIM.items():
        path = root / "shards" / "text_banks" / key / "text_bank.safetensors"
        path.parent.mkdir(parents=True)
        save_text_bank(path, list(DEFAULT_PARTS), torch.randn(len(DEFAULT_PARTS), dim, generator=g),
                       TEXT_SPEC[key], ["{part}"])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def reference_stage1(project: Path) -> Path:
    """``configs/reference/stage1.yaml`` fitted one step in the project: what most rows start from."""
    import os

    cwd = os.getcwd()
    os.chdir(project)
    try:
        _fit(REPO_ROOT / "configs" / "reference" / "stage1.yaml")
    finally:
        os.chdir(cwd)
    last = project / "outputs" / "reference_stage1" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    return last


def _row_configs() -> list[str]:
    return sorted(str(p.relative_to(ABLATIONS)) for p in ABLATIONS.rglob("*.yaml"))


def test_every_table_row_has_one_config_and_one_registry_entry() -> None:
    rows = {(r.table, r.key) for r in ABLATION_ROWS}
    expected = {(t, k) for t, keys in TALK_MIOU.items() for k in keys}
    assert rows == expected and list(ABLATION_TABLES) == list(TALK_MIOU)
    stage1 = {f"teacher/{k}_stage1.yaml" for k in TEACHER_DIM}
    assert set(_row_configs()) == {f"{t}/{k}.yaml" for t, k in expected} | stage1
    for r in ABLATION_ROWS:
        talk = TALK_MIOU[r.table][r.key]
        assert r.in_talk == (talk is not None)
        if talk is not None:  # the paper's two decimals round to the talk's one
            assert round(r.metrics["instance_mIoU"], 1) == talk, r
        cfg = yaml.safe_load((REPO_ROOT / r.config).read_text())
        assert cfg["trainer"]["default_root_dir"] == r.run_dir  # the report finds the row by it


@pytest.mark.parametrize("name", _row_configs())
def test_ablation_header_names_row_weights_and_commands(name: str) -> None:
    """The header is the row's documentation: its number, the fit and shard/eval commands, the weights."""
    text = (ABLATIONS / name).read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    table, key = name.removesuffix(".yaml").removesuffix("_stage1").split("/")
    talk = TALK_MIOU[table][key]
    if talk is not None:
        assert f"{talk}" in header
    assert f"python -m patchalign fit --config configs/ablations/{name}" in header
    assert "huggingface-cli download" in header
    if table == "teacher" and key != "dinov2":
        assert "python -m patchalign shards build" in header and "--teacher " in header
    if table == "text_encoder" and key != "openclip_bigg":
        assert f"--text_encoder {TEXT_SPEC[key]}" in header
        assert f"--model.init_args.eval_text_encoder {TEXT_SPEC[key]}" in header
    if not name.endswith("_stage1.yaml"):
        assert re.search(r"python -m patchalign test --config configs/eval/shapenetpart.yaml", header)


def _blocks(names: list[str]) -> set[int]:
    return {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}


@pytest.mark.parametrize("name", _row_configs())
def test_ablation_config_fits_one_step_on_stand_ins(
    name: str, project: Path, reference_stage1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    table, key = name.removesuffix(".yaml").split("/")
    stage1_ckpt = project / f"outputs/ablations/teacher/{key}_stage1/checkpoints/last.ckpt"
    if key in TEACHER_DIM and not stage1_ckpt.is_file():  # the row's own Stage 1 first, unless its test ran
        _fit(ABLATIONS / f"teacher/{key}_stage1.yaml")
    cli = _fit(ABLATIONS / name)
    model = cli.model
    assert cli.trainer.global_step == 1
    assert (project / yaml.safe_load((ABLATIONS / name).read_text())["trainer"]["default_root_dir"]).is_dir()
    if key.endswith("_stage1"):
        assert type(model).__name__ == "Stage1Distillation"
        assert model.encoder.config.head_dim == TEACHER_DIM[key.removesuffix("_stage1")]
        assert all(p.requires_grad for p in model.encoder.parameters())
        return
    assert type(model).__name__ == ("JointTraining" if key == "joint" else "Stage2Alignment")
    assert model.encoder.config.head_dim == TEXT_BANK_DIM.get(key, TEXT_DIM)
    if key in TEXT_SPEC:
        assert model.hparams["text_encoder"] == TEXT_SPEC[key]  # provenance for export and evaluation
    if key == "joint":
        assert model.distill_head.proj.out_features == FEATURE_DIM
        assert model.joint_weight == 1.0
    trained = _blocks(model.trainable_names)
    assert trained == TRAINED_BLOCKS.get(key, {DEPTH - 1}), trained
    assert all(n.startswith("head.") for n in model.trainable_names if key == "frozen_encoder")
    init = model.hparams["init_from"]
    if key in FROM_SCRATCH:
        assert init is None
    else:  # started from a Stage 1 run: the reference's, or the teacher row's own
        stage1 = (
            f"outputs/ablations/teacher/{key}_stage1" if key in TEACHER_DIM else "outputs/reference_stage1"
        )
        assert init == f"{stage1}/checkpoints/last.ckpt"
        s1 = torch.load(project / init, map_location="cpu", weights_only=True)["state_dict"]
        frozen = (
            "encoder.blocks.0.attn.qkv.weight"  # block 0 trains in "full" only: compare a tokenizer weight
        )
        weight = "encoder.encoder.first_conv.0.weight"
        if 0 not in trained:
            assert torch.equal(model.state_dict()[frozen], s1[frozen])
        if key != "full":
            assert torch.equal(model.state_dict()[weight], s1[weight])
