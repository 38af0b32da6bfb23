"""Training: LightningModules, the CLI, DDP on CPU, preempt-and-resume, and the Slurm scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO_ROOT as REPO
from conftest import save_lightning_checkpoint

from patchalign.checkpoints import safe_torch_load
from patchalign.data.datamodule import ShardDataModule
from patchalign.data.synthetic import write_synthetic_shards
from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.training.cli import cli_main
from patchalign.training.modules import (
    OptimizerConfig,
    Stage1Distillation,
    Stage2Alignment,
    patch_feature_targets,
    soft_text_targets,
)

TINY = {
    "num_groups": 16,
    "group_size": 8,
    "encoder_dims": 32,
    "trans_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "drop_path_rate": 0.1,
}


#: ``python -m patchalign`` in a subprocess (the users' command, verbatim)
PATCHALIGN = [sys.executable, "-m", "patchalign"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    train = write_synthetic_shards(root / "train", [7, 3, 5], num_points=2048, feature_dim=12)
    val = write_synthetic_shards(root / "val", [4], num_points=2048, feature_dim=12, uid_prefix="val")
    return {"train": Path(train), "val": Path(val)}


def _config(tmp: Path, stage: int, shards: dict[str, Path], **model_args) -> Path:
    """A tiny config derived from the shipped stage config (so the shipped file is what is tested)."""
    cfg = yaml.safe_load((REPO / "configs" / f"stage{stage}.yaml").read_text())
    cfg["trainer"].update(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(tmp / f"run{stage}"),
        enable_model_summary=False,
    )
    cfg["model"]["init_args"]["encoder"]["init_args"]["config"].update(TINY)
    cfg["model"]["init_args"]["optim"]["warmup_steps"] = 1
    cfg["model"]["init_args"].update(**model_args)
    cfg["data"]["init_args"].update(
        data_path=str(shards["train"]),
        val_path=str(shards["val"]),
        batch_size=4,
        num_workers=0,
        num_points=256,
        pin_memory=False,
    )
    path = tmp / f"stage{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_patch_feature_targets_by_hand() -> None:
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [3.0, 0.0]]])
    gidx = torch.tensor([[[0, 1], [2, 2], [0, 3]]])
    target, mask = patch_feature_targets(feats, gidx)
    s = 2**-0.5
    assert torch.allclose(target[0, 0], torch.tensor([s, s]))
    assert mask.tolist() == [[True, False, True]]  # patch 1 only has a point without a feature
    assert torch.allclose(target[0, 2], torch.tensor([1.0, 0.0]))


def test_soft_text_targets_scatter_onto_bank_columns() -> None:
    membership = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    label_ids = torch.tensor([[4, 1, -1]])
    membership = torch.cat([membership, torch.zeros(1, 4, 1)], dim=-1)  # padded third label
    gidx = torch.tensor([[[0, 1], [2, 3]]])
    y = soft_text_targets(membership, label_ids, gidx, num_text=5)
    expected = torch.zeros(1, 2, 5)
    expected[0, 0, 4], expected[0, 0, 1] = 1.0, 0.5
    expected[0, 1, 1] = 0.5
    assert torch.equal(y, expected)


def test_optimizer_groups_and_decay_exclusions() -> None:
    module = Stage2Alignment(
        PatchAlignEncoder(EncoderConfig(**TINY, head_dim=8)),
        freeze_blocks=1,
        loss="siglip",
        trainable="blocks",
        optim=OptimizerConfig(decay_all_params=False),
    )
    module.trainer = None  # configure_optimizers needs stepping batches: patch them in
    module._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = module.configure_optimizers()["optimizer"]
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert by_id[id(named["encoder.head.proj.weight"])]["initial_lr"] == 5e-4
    assert by_id[id(named["encoder.head.proj.weight"])]["weight_decay"] == 0.05
    assert by_id[id(named["encoder.head.proj.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["logit_params.logit_scale"])]["weight_decay"] == 0.0
    assert by_id[id(named["encoder.blocks.1.attn.qkv.weight"])]["initial_lr"] == 1e-4
    assert by_id[id(named["encoder.norm.weight"])]["weight_decay"] == 0.0
    assert id(named["encoder.blocks.0.attn.qkv.weight"]) not in by_id  # frozen


def test_stage2_frozen_means_frozen() -> None:
    enc = PatchAlignEncoder(EncoderConfig(**TINY, head_dim=8))
    module = Stage2Alignment(enc, freeze_blocks=1, frozen_train_mode=False).train()
    assert enc.blocks[0] in module.frozen_modules and enc.blocks[1] not in module.frozen_modules
    assert not enc.encoder.training and not enc.blocks[0].training and enc.blocks[1].training
    bn = enc.encoder.first_conv[1]
    before = bn.running_mean.clone()
    enc(torch.randn(2, 128, 3))
    assert torch.equal(bn.running_mean, before)
    released = Stage2Alignment(PatchAlignEncoder(EncoderConfig(**TINY, head_dim=8)), freeze_blocks=1).train()
    assert released.hparams.frozen_train_mode and released.encoder.encoder.training  # the released default
    with pytest.raises(ValueError, match="freeze_blocks"):
        Stage2Alignment(PatchAlignEncoder(EncoderConfig(**TINY, head_dim=8)), freeze_blocks=3)


def test_stage1_then_stage2_through_the_cli(tmp_path: Path, shards: dict[str, Path]) -> None:
    cli1 = cli_main(["fit", "--config", str(_config(tmp_path, 1, shards))])
    assert cli1.trainer.global_step == 4
    assert cli1.model.encoder.config.head_dim == 12  # linked from the shards' feature width
    last1 = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    assert last1.exists()
    ckpt = safe_torch_load(last1)  # a real Lightning checkpoint loads with weights_only=True
    assert ckpt["hyper_parameters"]["encoder_config"]["head_dim"] == 12

    for loss in ("siglip", "bce"):
        cfg2 = _config(tmp_path, 2, shards, init_from=str(last1), freeze_blocks=1, loss=loss)
        cli2 = cli_main(["fit", "--config", str(cfg2), "--trainer.default_root_dir", str(tmp_path / loss)])
        enc2 = cli2.model.encoder
        assert enc2.config.head_dim == 8  # linked from the text bank
        # frozen parts equal the Stage 1 weights; the trained block moved
        s1 = {k[len("encoder.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
        assert torch.equal(enc2.blocks[0].attn.qkv.weight, s1["blocks.0.attn.qkv.weight"])
        assert torch.equal(enc2.encoder.first_conv[0].weight, s1["encoder.first_conv.0.weight"])
        # frozen_train_mode: true (released): the frozen tokenizer's BatchNorm statistics still move
        assert not torch.equal(
            enc2.encoder.first_conv[1].running_mean, s1["encoder.first_conv.1.running_mean"]
        )
        assert not torch.equal(enc2.blocks[1].mlp.fc1.weight, s1["blocks.1.mlp.fc1.weight"])
        metrics = cli2.trainer.callback_metrics
        assert "val/miou" in metrics and 0.0 <= float(metrics["val/miou"]) <= 1.0


def test_print_config_documents_itself(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *PATCHALIGN,
            "fit",
            "--config",
            str(REPO / "configs/stage2.yaml"),
            "--print_config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["class_path"] == "patchalign.training.modules.Stage2Alignment"
    assert printed["model"]["init_args"]["loss"] == "siglip"


@pytest.mark.parametrize("stage", [1, 2])
def test_reference_configs_print_the_released_recipe(tmp_path: Path, stage: int) -> None:
    """``fit --config configs/reference/stage{1,2}.yaml --print_config``: the released values, resolved."""
    cmd = [
        *PATCHALIGN,
        "fit",
        "--config",
        str(REPO / f"configs/reference/stage{stage}.yaml"),
    ]
    out = subprocess.run(cmd + ["--print_config"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    tr, m = cfg["trainer"], cfg["model"]["init_args"]
    assert cfg["seed_everything"] == 42 and tr["max_epochs"] == 100 and tr["gradient_clip_val"] is None
    assert tr["precision"] == ("16-mixed" if stage == 1 else "32-true")
    assert m["optim"] == {
        "lr": 1e-4,
        "head_lr": 5e-4,
        "weight_decay": 0.05,
        "decay_all_params": True,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "schedule": "constant",
        "warmup_steps": 0,
        "min_lr_ratio": 0.01,
        "global_batch_size": 32,
        "ddp_rule": "keep_global_batch",
    }
    enc = m["encoder"]["init_args"]["config"]
    assert (enc["norm_eps"], enc["fps_rule"], enc["fps_start"], enc["drop_path_rate"]) == (
        1e-5,
        "pointnet2",
        0,
        0.1,
    )
    data = cfg["data"]["init_args"]
    assert data["batch_size"] == 32 and data["rotate_up"] is False and data["scale_range"] is None
    if stage == 2:
        assert (m["loss"], m["temperature"], m["max_logit_scale"], m["trainable"]) == (
            "bce",
            "log",
            100.0,
            "released",
        )
        assert (
            m["frozen_train_mode"] is True
            and m["exclude_category_label"] is True
            and m["init_strict"] is True
        )


def _sbatch_header(script: Path) -> dict[str, str]:
    header = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line)
        if m:
            header[m.group(1)] = m.group(2) or ""
    return header


@pytest.mark.parametrize("stage", [1, 2])
def test_slurm_script_resources_reach_the_cli(tmp_path: Path, shards: dict[str, Path], stage: int) -> None:
    script = REPO / "slurm" / f"stage{stage}.sh"
    h = _sbatch_header(script)
    assert h["signal"] == "SIGUSR1@90" and "requeue" in h
    assert h["ntasks-per-node"] == h["gpus-per-node"]  # one task per GPU, as Lightning expects
    # Run the script with a fake srun that records its argv, under the environment Slurm would set.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "srun_args"
    (bindir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (bindir / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": h["nodes"],
        "SLURM_NTASKS_PER_NODE": h["ntasks-per-node"],
        "SLURM_CPUS_PER_TASK": h["cpus-per-task"],
    }
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    argv = record.read_text().splitlines()
    assert argv[:4] == ["--kill-on-bad-exit=1", "python", "-m", "patchalign"]
    cli_args = argv[4:] + [
        "--data.init_args.data_path",
        str(shards["train"]),
        "--data.init_args.val_path",
        str(shards["val"]),
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    if stage == 2:
        cli_args += ["--model.init_args.init_from", "null"]
    cli = cli_main(cli_args[1:], run=False)  # drop the "fit" verb: run=False takes no subcommand
    assert cli.trainer.num_nodes == int(h["nodes"])
    assert cli.trainer.num_devices == int(h["ntasks-per-node"])
    assert cli.datamodule.num_workers == int(h["cpus-per-task"]) - 2


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_fit_two_processes_gloo(tmp_path: Path, shards: dict[str, Path]) -> None:
    """``fit`` with 2 CPU processes (gloo) through the real CLI: both ranks run the same steps."""
    cfg = _config(tmp_path, 1, shards)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            *PATCHALIGN,
            "fit",
            "--config",
            str(cfg),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.max_steps",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = safe_torch_load(tmp_path / "run1" / "checkpoints" / "last.ckpt")  # weights_only + allow-list
    # optim.ddp_rule: keep_global_batch: the configured batch 4 stays the GLOBAL batch (2 per rank), so
    # 15 training samples → ceil(15 / 4) = 4 batches per rank per epoch: 4 steps = 1 full epoch, at the
    # configured lr (before this rule: batch 4 per rank, global 8, 2 epochs in 4 steps)
    assert "global batch 4 = 2 per rank x 2 ranks x 1 accumulation" in out.stdout, out.stdout[-2000:]
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 0
    assert "world_size=2" in out.stderr or "distributed_backend=gloo" in out.stderr


class _Preempted(RuntimeError):
    pass


class _SaveThenDie(L.Callback):
    """Simulates a preemption: checkpoint after ``step`` optimizer steps, then the process 'dies'."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise _Preempted


def _fit(
    shards: dict[str, Path],
    max_steps: int,
    callbacks: list | None = None,
    ckpt: Path | None = None,
    seen: list | None = None,
) -> Stage1Distillation:
    L.seed_everything(0)
    dm = ShardDataModule(
        str(shards["train"]),
        batch_size=4,
        num_workers=1,
        num_points=256,
        pin_memory=False,
        rotate_up=True,
        scale_range=(0.8, 1.2),
    )
    model = Stage1Distillation(
        PatchAlignEncoder(EncoderConfig(**TINY, head_dim=12)),
        optim=OptimizerConfig(warmup_steps=2, schedule="cosine"),  # drop-path 0.1: RNG resumes
    )
    if seen is not None:
        orig = model.training_step

        def record(batch: dict, batch_idx: int) -> torch.Tensor:
            seen.append(tuple(batch["uid"]))
            return orig(batch, batch_idx)

        model.training_step = record  # type: ignore[method-assign]
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=callbacks or [],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm, ckpt_path=str(ckpt) if ckpt else None)
    model.final_step = trainer.global_step
    return model


@pytest.mark.parametrize("stop_at", [2, 4])  # mid-epoch, and exactly at an epoch boundary (4 batches/epoch)
def test_preempt_and_resume_continues_the_same_run(
    tmp_path: Path, shards: dict[str, Path], stop_at: int
) -> None:
    seen_full: list = []
    full = _fit(shards, 6, seen=seen_full)
    ckpt = tmp_path / "preempt.ckpt"
    seen_a: list = []
    with pytest.raises(_Preempted):
        _fit(shards, 6, callbacks=[_SaveThenDie(stop_at, ckpt)], seen=seen_a)
    seen_b: list = []
    resumed = _fit(shards, 6, ckpt=ckpt, seen=seen_b)
    assert resumed.final_step == full.final_step == 6
    assert seen_a + seen_b == seen_full  # the resumed run continues the same data stream
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_cli_test_on_real_shapenetpart_from_an_export_dir(tmp_path: Path, snp_root: Path) -> None:
    """``python -m patchalign test --config configs/eval/shapenetpart.yaml`` on the real shapes gives
    the numbers of the script path (no Lightning) on the same files, model and text encoder."""
    root = snp_root
    from patchalign.tools.export import export_checkpoint

    cfg = EncoderConfig(**{**TINY, "drop_path_rate": 0.0}, head_dim=384)  # MiniLM width
    enc = PatchAlignEncoder(cfg)
    save_lightning_checkpoint(tmp_path / "m.ckpt", enc)
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "export")
    args = [
        "test",
        "--config",
        str(REPO / "configs" / "eval" / "shapenetpart.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.root",
        str(root),
        "--data.init_args.split",
        "trainval",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "2",
        "--model.init_args.init_from",
        str(tmp_path / "export"),
        "--model.init_args.eval_text_encoder",
        "demo",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    cli = cli_main(args)  # no encoder overrides: the architecture is read from the export
    # the exported weights were loaded, head included
    assert torch.equal(cli.model.encoder.head.proj.weight, enc.head.proj.weight)
    metrics = cli.trainer.callback_metrics
    keys = [k for k in metrics if k.startswith("test/")]
    assert keys, metrics
    rows = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    assert len(rows) >= 2
    # The independent expectation: the script path's numbers on the same split (not just 0 <= mIoU <= 1).
    from patchalign.eval.datamodule import EvalDataModule
    from patchalign.eval.evaluator import run_zero_shot_eval
    from patchalign.pretrained import load_pretrained
    from patchalign.text import load_text_encoder

    data = yaml.safe_load((REPO / "configs" / "eval" / "shapenetpart.yaml").read_text())["data"]["init_args"]
    dm = EvalDataModule(**dict(data, root=str(root), split="trainval", num_workers=0))
    dm.setup("test")
    script = run_zero_shot_eval(
        load_pretrained(tmp_path / "export", device="cpu"), dm.test_dataset, load_text_encoder("demo"),
        batch_size=2, templates="part_only", device="cpu", verbose=False,
    )  # fmt: skip
    compared = [k for k in script.scalars if f"test/{k}" in metrics]
    assert any("miou" in k.lower() for k in compared), (sorted(script.scalars), keys)
    for k in compared:
        assert float(metrics[f"test/{k}"]) == pytest.approx(script.scalars[k], abs=1e-5), k


def test_validation_point_miou_by_hand() -> None:
    """Released convention: parts absent from the ground truth are skipped; unlabelled points ignored."""
    from patchalign.training.metrics import point_miou

    # shape 0: 6 points, parts {0,1,2}; part 2 absent from GT. shape 1: padding (no parts).
    memb = torch.zeros(2, 6, 3)
    memb[0, [0, 1, 2], 0] = 1
    memb[0, [3, 4], 1] = 1  # point 5 unlabelled
    patch_pred = torch.tensor([[0, 1, 2], [0, 0, 0]])
    point_to_patch = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]])
    label_mask = torch.tensor([[True, True, True], [False, False, False]])
    miou = point_miou(patch_pred, point_to_patch, memb, label_mask)
    # points 0..4 predicted 0,0,1,1,2 vs GT 0,0,0,1,1: part 0 IoU 2/3, part 1 IoU 1/3 (point 4 predicted 2)
    assert miou.shape == (1,) and miou.item() == pytest.approx((2 / 3 + 1 / 3) / 2)


@pytest.mark.parametrize("loss", ["siglip", "bce"])
def test_stage2_loss_uses_only_the_batch_columns_and_matches_full_bank_targets(loss: str) -> None:
    """Targets are built over the batch's names only; the loss equals the full-text-bank formulation."""
    from patchalign.losses import per_shape_bce_loss, sigmoid_patch_text_loss

    torch.manual_seed(0)
    enc = PatchAlignEncoder(EncoderConfig(**{**TINY, "drop_path_rate": 0.0}, head_dim=8))
    module = Stage2Alignment(enc, freeze_blocks=1, loss=loss).eval()
    bank = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    module.text_vectors = bank
    label_ids = torch.tensor([[3, 17, -1], [17, 42, 5], [-1, -1, -1]])
    batch = {
        "points": torch.randn(3, 128, 3),
        "label_ids": label_ids,
        "label_mask": label_ids >= 0,
        "membership": (torch.rand(3, 128, 3) > 0.5).float() * (label_ids >= 0)[:, None, :],
    }
    with torch.no_grad():
        out, targets, local, used = module._scores(batch)
        assert targets.shape[-1] == used.numel() == 4  # not the bank's 50
        got = module._loss(out, targets, local, used, batch)
        full = soft_text_targets(batch["membership"], label_ids, out.group_index, 50)
        z = out.patch_features
        if loss == "siglip":
            y = full[..., used].reshape(-1, 4)
            ref = sigmoid_patch_text_loss(
                z.reshape(-1, 8),
                bank[used],
                y,
                module.logit_params.logit_scale,
                module.logit_params.logit_bias,
            )
        else:
            ids = label_ids.clamp_min(0)
            y = torch.gather(full, 2, ids[:, None, :].expand(-1, z.shape[1], -1))
            ref = per_shape_bce_loss(
                z, bank[ids], y, label_ids >= 0, module.logit_params.logit_scale, form="log_scale"
            )
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_stage1_uses_released_patch_targets_when_the_batch_has_them() -> None:
    """Each predicted centre takes the stored feature of its nearest stored centre (released matching)."""
    torch.manual_seed(0)
    module = Stage1Distillation(
        PatchAlignEncoder(EncoderConfig(**{**TINY, "drop_path_rate": 0.0}, head_dim=6))
    )
    module.eval()
    g = torch.Generator().manual_seed(1)
    points = torch.randn(2, 128, 3, generator=g)
    stored_c = torch.randn(2, 10, 3, generator=g)
    stored_f = torch.randn(2, 10, 6, generator=g).half()
    batch = {"points": points, "patch_centers": stored_c, "patch_features": stored_f}
    out = module.encoder(points)
    target, mask = module.targets(batch, out)
    for b in range(2):  # a plain loop over predicted centres as the reference
        for i in range(out.centers.shape[1]):
            j = int(((stored_c[b] - out.centers[b, i]) ** 2).sum(-1).argmin())
            torch.testing.assert_close(
                target[b, i], torch.nn.functional.normalize(stored_f[b, j].float(), dim=0)
            )
    assert bool(mask.all())
    loss, _ = module._step(batch)
    ref = (1 - (torch.nn.functional.normalize(out.patch_features, dim=-1) * target).sum(-1)).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)  # released: mean over patches and shapes
    per_point = {"points": points, "features": torch.randn(2, 128, 6, generator=g)}
    t2, _ = module.targets(per_point, out)  # without patch_centers: the per-point mean, as before
    torch.testing.assert_close(t2, patch_feature_targets(per_point["features"], out.group_index)[0])
    with pytest.raises(ValueError, match="width"):
        module.targets({**batch, "patch_features": stored_f[..., :4]}, out)


def test_exclude_category_label_drops_the_category_named_part() -> None:
    enc = PatchAlignEncoder(EncoderConfig(**{**TINY, "drop_path_rate": 0.0}, head_dim=8))
    module = Stage2Alignment(enc, exclude_category_label=True)
    bank = type("Bank", (), {"vectors": torch.randn(3, 8), "names": ["chair", "leg", "seat"]})()
    module.set_text_bank(bank)
    membership = torch.zeros(2, 64, 3)
    membership[:, :20, 0], membership[:, 20:40, 1], membership[:, 40:, 2] = 1, 1, 1
    batch = {
        "points": torch.randn(2, 64, 3),
        "membership": membership,
        "label_ids": torch.tensor([[0, 1, 2], [0, 1, 2]]),
        "label_mask": torch.ones(2, 3, dtype=torch.bool),
        "category": ["Chair", "table"],  # the released comparison is on cleaned names
    }
    _, _, local, used = module._scores(batch)
    assert batch["label_ids"].tolist() == [[-1, 1, 2], [0, 1, 2]]
    assert batch["label_mask"].tolist() == [[False, True, True], [True, True, True]]
    assert batch["membership"][0, :, 0].sum() == 0 and batch["membership"][1, :, 0].sum() == 20
    assert used.tolist() == [0, 1, 2] and local[0, 0] == -1


class _FakeTrainer:
    def __init__(self, world_size: int, accumulate: int, dm: object) -> None:
        self.world_size, self.accumulate_grad_batches, self.datamodule = world_size, accumulate, dm
        self.is_global_zero, self.estimated_stepping_batches = True, 10


def test_ddp_batch_rule_keeps_the_global_batch_or_scales_the_lr(capsys: pytest.CaptureFixture[str]) -> None:
    def run(world: int, per_rank: int, **optim: object) -> tuple[Stage1Distillation, object]:
        module = Stage1Distillation(
            PatchAlignEncoder(EncoderConfig(**TINY, head_dim=4)), optim=OptimizerConfig(**optim)
        )
        dm = type("DM", (), {"batch_size": per_rank})()
        module._trainer = _FakeTrainer(world, 1, dm)
        module.setup("fit")
        return module, dm

    _, dm = run(8, 32, global_batch_size=32)  # the Slurm 2 x 4 allocation with the released batch
    assert dm.batch_size == 4  # 32 per step over 8 ranks, lr unchanged
    assert "global batch 32 = 4 per rank x 8 ranks" in capsys.readouterr().out
    _, dm = run(8, 32)  # global_batch_size null: data.batch_size is the global batch
    assert dm.batch_size == 4
    module, dm = run(8, 32, global_batch_size=32, ddp_rule="scale_lr")
    assert dm.batch_size == 32 and module._lr_factor == 8.0
    opt = module.configure_optimizers()["optimizer"]
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([8e-4, 4e-3])  # linear scaling
    module, dm = run(8, 32, ddp_rule="none")
    assert dm.batch_size == 32 and module._lr_factor == 1.0
    assert "WARNING: not the reference batch 32" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not divisible"):
        run(3, 32, global_batch_size=32)
    _, dm = run(1, 32, global_batch_size=32)  # one GPU, the released setting: nothing changes
    assert dm.batch_size == 32


def test_stage1_fits_on_compact_released_targets_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards with only the released per-shape patch targets (no per-point features) train Stage 1."""
    import patchalign.patch_targets as pt

    calls: list[tuple[int, ...]] = []
    real = pt.match_patch_targets

    def spy(centers: torch.Tensor, stored_c: torch.Tensor, stored_f: torch.Tensor):
        calls.append(tuple(stored_c.shape))
        return real(centers, stored_c, stored_f)

    monkeypatch.setattr(pt, "match_patch_targets", spy)
    train = write_synthetic_shards(
        tmp_path / "c_train", [6], num_points=2048, feature_dim=12, targets="patches"
    )
    val = write_synthetic_shards(
        tmp_path / "c_val", [4], num_points=2048, feature_dim=12, targets="patches", uid_prefix="val"
    )
    cfg = _config(tmp_path, 1, {"train": Path(train), "val": Path(val)})
    cli = cli_main(["fit", "--config", str(cfg)])
    assert cli.trainer.global_step == 4
    assert cli.model.encoder.config.head_dim == 12
    assert 0.0 <= float(cli.trainer.callback_metrics["val/loss"]) <= 2.0
    assert calls and all(c[1:] == (128, 3) for c in calls)  # the released matching made every target


# ------------------------------------------------------------------------------- joint training


def _joint_batch(shards: dict[str, Path]) -> tuple[dict, object]:
    """One training batch (features, labels, text bank) of the synthetic shards, and their bank."""
    dm = ShardDataModule(str(shards["train"]), batch_size=4, num_workers=0, num_points=256, pin_memory=False)
    dm.setup("fit")
    return next(iter(dm.train_dataloader())), dm.text_bank


def test_joint_loss_is_text_plus_weighted_distillation(shards: dict[str, Path]) -> None:
    """``L = L_text + w * L_2D`` with L_2D = mean(1 - cos) of the distillation head's own output, and
    the encoder's gradient at ``w = 0`` is Stage 2's alone (the second head touches only its loss)."""
    from patchalign.losses import joint_loss
    from patchalign.training.modules import JointTraining

    batch, bank = _joint_batch(shards)
    enc = PatchAlignEncoder(EncoderConfig(**{**TINY, "drop_path_rate": 0.0}, head_dim=8))
    joint = JointTraining(enc, joint_weight=0.5, target_widths={"features": 12, "text": 8}).eval()
    joint.set_text_bank(bank)
    assert joint.encoder.head.proj.out_features == 8 and joint.distill_head.proj.out_features == 12
    assert all(p.requires_grad for p in enc.parameters())  # every block trains
    total, text, distill, out, *_ = joint._joint_step(dict(batch))
    # the distillation term by hand: the second head on the same tokens, patch-mean teacher targets
    pred = joint.distill_head(out.patch_tokens)
    target, mask = patch_feature_targets(batch["features"], out.group_index)
    by_hand = (1 - (pred * target).sum(-1))[mask].mean()
    assert torch.allclose(distill, by_hand, atol=1e-5)
    assert torch.allclose(total, text + 0.5 * distill, atol=1e-5)
    assert torch.allclose(joint_loss(distill, text, 1.0), text + distill)
    with pytest.raises(ValueError, match=">= 0"):
        joint_loss(distill, text, -1.0)

    # w = 0: the encoder's gradient is the text loss's, as Stage 2 (same weights, same batch) gets it
    stage2 = Stage2Alignment(
        PatchAlignEncoder(EncoderConfig(**{**TINY, "drop_path_rate": 0.0}, head_dim=8)), trainable="all"
    ).eval()
    stage2.load_state_dict({k: v for k, v in joint.state_dict().items() if not k.startswith("distill_")})
    stage2.set_text_bank(bank)
    joint.joint_weight = 0.0
    grads = []
    for module in (joint, stage2):
        module.zero_grad()
        torch.manual_seed(0)  # the same FPS start points
        if module is joint:
            loss = module._joint_step(dict(batch))[0]
        else:
            out2, t2, ids2, used2 = module._scores(dict(batch))
            loss = module._loss(out2, t2, ids2, used2, dict(batch))
        loss.backward()
        grads.append(module.encoder.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert joint.distill_head.proj.weight.grad is None or joint.distill_head.proj.weight.grad.abs().sum() == 0


def test_joint_training_refuses_what_it_cannot_train() -> None:
    from patchalign.training.modules import JointTraining

    enc = lambda: PatchAlignEncoder(EncoderConfig(**TINY, head_dim=8))  # noqa: E731
    with pytest.raises(ValueError, match="joint_weight must be >= 0"):
        JointTraining(enc(), joint_weight=-0.1, distill_dim=12)
    with pytest.raises(ValueError, match="needs the teacher width"):
        JointTraining(enc(), target_widths={"text": 8})  # shards without teacher features


def test_joint_training_through_the_cli_exports_the_text_head(
    tmp_path: Path, shards: dict[str, Path]
) -> None:
    """``configs/ablations/strategy/joint.yaml`` trains both heads; export keeps only the text one, and
    load_pretrained reads it back; without teacher features the run is refused in one line."""
    from patchalign.pretrained import load_pretrained
    from patchalign.tools.export import export_checkpoint
    from patchalign.training.cli import run_cli

    cfg = yaml.safe_load((REPO / "configs" / "ablations" / "strategy" / "joint.yaml").read_text())
    cfg["trainer"].update(
        accelerator="cpu", precision="32-true", max_steps=2, max_epochs=1, limit_val_batches=1,
        check_val_every_n_epoch=1, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path / "joint"),
    )  # fmt: skip
    cfg["model"]["init_args"]["encoder"]["init_args"]["config"].update(TINY)
    cfg["model"]["init_args"]["optim"]["global_batch_size"] = 4
    cfg["data"]["init_args"].update(
        data_path=str(shards["train"]), val_path=str(shards["val"]), batch_size=4, num_workers=0,
        num_points=256, pin_memory=False,
    )  # fmt: skip
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path)])
    assert type(cli.model).__name__ == "JointTraining" and cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"train/text_loss", "train/distill_loss", "train/cosine"} <= set(metrics)
    last = tmp_path / "joint" / "checkpoints" / "last.ckpt"
    state = safe_torch_load(last)["state_dict"]
    assert state["distill_head.proj.weight"].shape == (12, TINY["trans_dim"])
    export_checkpoint(last, tmp_path / "export")
    model = load_pretrained(tmp_path / "export")
    assert model.encoder.config.head_dim == 8  # the text head, not the 12-wide distillation head

    # evaluated with --ckpt_path: the distillation head is left out (Lightning's strict restore of a
    # ZeroShotSegmentation would refuse it); encoder, text head and logit parameters load through
    # init_from, strictly
    from jsonargparse import Namespace

    from patchalign.eval.module import ZeroShotSegmentation
    from patchalign.training.cli import PatchAlignCLI

    model_ns = Namespace(init_from="patchalign3d.pt", init_head=False)
    ns = Namespace(
        ckpt_path=str(last),
        model=Namespace(class_path="patchalign.eval.module.ZeroShotSegmentation", init_args=model_ns),
    )
    PatchAlignCLI._route_ckpt_path(object.__new__(PatchAlignCLI), ns, "test")
    assert ns.ckpt_path is None and model_ns.init_from == str(last) and model_ns.init_head is True
    enc_cfg = EncoderConfig.from_dict(safe_torch_load(last)["hyper_parameters"]["encoder_config"])
    ev = ZeroShotSegmentation(PatchAlignEncoder(enc_cfg), init_from=str(last), init_head=True, loss="bce")
    assert torch.equal(ev.encoder.head.proj.weight, state["encoder.head.proj.weight"])
    assert torch.equal(ev.logit_params.logit_scale, state["logit_params.logit_scale"])
    # validating with the joint module itself: Lightning restores everything, the distill head included
    joint_ns = Namespace(
        class_path="patchalign.training.modules.JointTraining", init_args=Namespace(init_from=None)
    )
    s2 = Namespace(ckpt_path=str(last), model=joint_ns)
    PatchAlignCLI._route_ckpt_path(object.__new__(PatchAlignCLI), s2, "validate")
    assert s2.ckpt_path == str(last)

    err = tmp_path / "err.txt"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = run_cli(
            ["fit", "--config", str(path), "--data.init_args.load_features", "false",
             "--trainer.default_root_dir", str(tmp_path / "refused")]
        )  # fmt: skip
    err.write_text(buf.getvalue())
    assert rc == 2
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert lines[-1].startswith("patchalign fit: error: JointTraining distils the teacher features")
