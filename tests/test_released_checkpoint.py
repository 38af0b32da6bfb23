"""The released PatchAlign3D checkpoint format is first-class: strict loads everywhere, same features.

``ReleasedPointTransformer`` below is an independent re-implementation of the released module
structure (dickoah/PatchAlign3D ``src/models/point_transformer.py`` ``get_model`` with its
``PatchedGroup``/``Encoder``/``TransformerEncoder`` of ``Block``s, ``src/training/stage2.py``
``PatchToTextProj`` and ``LearnableTemp``), written from that code's structure, sharing nothing with
``patchalign.model``: Conv1d tokenizer, explicit-softmax attention, PyTorch-default LayerNorms, its
own FPS loop with the pointnet2 kernel's rule, explicit-distance kNN. Files saved from it have
exactly the released names and shapes (``RELEASED_KEYS`` is written out by hand from that structure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT as REPO
from torch import Tensor, nn

from patchalign.checkpoints import CheckpointError, read_checkpoint
from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.pretrained import load_pretrained
from patchalign.tools.export import export_checkpoint
from patchalign.training.modules import Stage2Alignment


# ----------------------------------------------------------------------------- released structure
def released_fps(xyz: Tensor, m: int) -> Tensor:
    """pointnet2_ops furthest_point_sample: start 0, temp 1e10, |p|^2 <= 1e-3 never selected."""
    b, n, _ = xyz.shape
    idx = torch.zeros(b, m, dtype=torch.long)
    for i in range(b):
        p = xyz[i]
        mag = p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1] + p[:, 2] * p[:, 2]
        temp = torch.full((n,), 1e10)
        old = 0
        for j in range(1, m):
            d = ((p - p[old]) ** 2).sum(-1)
            temp = torch.where(mag <= 1e-3, temp, torch.minimum(temp, d))
            cand = torch.where(mag <= 1e-3, torch.tensor(-1.0), temp)
            old = int(torch.argmax(cand)) if bool((cand > -1).any()) else 0
            idx[i, j] = old
    return idx


class ReleasedEncoder(nn.Module):
    def __init__(self, encoder_channel: int) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1),
        )

    def forward(self, groups: Tensor) -> Tensor:
        bs, g, n, c = groups.shape
        x = groups.reshape(bs * g, n, c).permute(0, 2, 1)
        f = self.first_conv(x)
        fg = torch.max(f, 2, keepdim=True)[0].repeat(1, 1, n)
        f = self.second_conv(torch.cat([fg, f], 1))
        return f.max(dim=2)[0].reshape(bs, g, self.encoder_channel)


class ReleasedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReleasedAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ReleasedBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # PyTorch default eps 1e-5, as released
        self.attn = ReleasedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ReleasedMlp(dim, dim * 4)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReleasedTransformerEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ReleasedBlock(dim, heads) for _ in range(depth)])

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x + pos)
        return x


class ReleasedPointTransformer(nn.Module):
    """``get_model``: group_divider (no parameters), encoder, reduce_dim, cls token/pos, pos_embed,
    blocks, norm."""

    def __init__(
        self, trans_dim: int, depth: int, heads: int, encoder_dims: int, groups: int, size: int
    ) -> None:
        super().__init__()
        self.num_group, self.group_size = groups, size
        self.encoder = ReleasedEncoder(encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.blocks = ReleasedTransformerEncoder(trans_dim, depth, heads)
        self.norm = nn.LayerNorm(trans_dim)

    def forward_patches(self, pts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pts (B, 3, N)`` (already y/z swapped) -> ``(B, C, G)``, ``(B, 3, G)``, ``(B, G, M)``."""
        xyz = pts.transpose(-1, -2).contiguous()
        b = xyz.shape[0]
        center = torch.stack([xyz[i, released_fps(xyz[i : i + 1], self.num_group)[0]] for i in range(b)])
        dist = ((center[:, :, None, :] - xyz[:, None, :, :]) ** 2).sum(-1)
        idx = dist.topk(self.group_size, dim=-1, largest=False).indices
        neigh = torch.stack([xyz[i][idx[i]] for i in range(b)]) - center[:, :, None, :]
        tokens = self.reduce_dim(self.encoder(neigh))
        x = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        pos = torch.cat((self.cls_pos.expand(b, -1, -1), self.pos_embed(center)), dim=1)
        emb = self.norm(self.blocks(x, pos))[:, 1:, :].transpose(-1, -2).contiguous()
        return emb, center.transpose(-1, -2).contiguous(), idx


class PatchToTextProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, patch_emb: Tensor) -> Tensor:
        return F.normalize(self.proj(patch_emb.transpose(1, 2)), dim=-1)


class LearnableTemp(nn.Module):
    def __init__(self, init_tau: float = 0.07) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.log(torch.tensor(1.0 / init_tau)))

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=100.0)


def released_keys(depth: int) -> list[str]:
    """The released state-dict names, written out from the module structure (not from a model)."""
    keys = []
    for seq, layers in (("first_conv", (0, 1, 3)), ("second_conv", (0, 1, 3))):
        for i in layers:
            if i == 1:  # BatchNorm1d
                keys += [f"encoder.{seq}.1.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
                keys.append(f"encoder.{seq}.1.num_batches_tracked")
            else:
                keys += [f"encoder.{seq}.{i}.weight", f"encoder.{seq}.{i}.bias"]
    keys += ["reduce_dim.weight", "reduce_dim.bias", "cls_token", "cls_pos"]
    keys += ["pos_embed.0.weight", "pos_embed.0.bias", "pos_embed.2.weight", "pos_embed.2.bias"]
    for i in range(depth):
        p = f"blocks.blocks.{i}."
        keys += [p + "norm1.weight", p + "norm1.bias", p + "attn.qkv.weight", p + "attn.proj.weight"]
        keys += [p + "attn.proj.bias", p + "norm2.weight", p + "norm2.bias"]
        keys += [p + n for n in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return keys + ["norm.weight", "norm.bias"]


def make_released(
    trans_dim: int = 384,
    depth: int = 12,
    encoder_dims: int = 256,
    groups: int = 128,
    size: int = 32,
    text_dim: int = 1280,
    seed: int = 0,
) -> tuple[ReleasedPointTransformer, PatchToTextProj, LearnableTemp]:
    torch.manual_seed(seed)
    model = ReleasedPointTransformer(trans_dim, depth, 6, encoder_dims, groups, size)
    with torch.no_grad():  # trained-looking values: BatchNorm statistics, norms, cls tokens
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1234)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        model.cls_token.normal_(0, 0.02)
    proj = PatchToTextProj(trans_dim, text_dim)
    temp = LearnableTemp()
    with torch.no_grad():
        temp.log_scale.fill_(math.log(42.0))
    return model.eval(), proj.eval(), temp


def save_released(path: Path, model: nn.Module, proj: nn.Module, temp: nn.Module | None, **args) -> Path:
    payload = {"epoch": 100, "model": model.state_dict(), "proj": proj.state_dict(), "args": dict(args)}
    if temp is not None:
        payload["temp"] = temp.state_dict()
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def tiny_released(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    """A small released-format file (6 heads as released; 2 blocks, 48 wide, 16 patches of 8)."""
    parts = make_released(trans_dim=48, depth=2, encoder_dims=32, groups=16, size=8, text_dim=24)
    path = tmp_path_factory.mktemp("released") / "patchalign3d.pt"
    save_released(path, *parts, num_group=16, group_size=8, clip_model="ViT-bigG-14")
    return path, parts


def _shapenetpart_points(shared_data: Path, n: int = 2048) -> Tensor:
    root = shared_data / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    files = (
        sorted(root.glob("0*/*.txt"))
        + sorted((shared_data / "shapenetpart" / "cap_gridsampled").glob("*.txt"))[:2]
    )
    if len(files) < 2:
        pytest.skip("real ShapeNetPart shapes not available")
    clouds = []
    for i, f in enumerate(files):
        xyz = np.loadtxt(f)[:, :3].astype(np.float32)
        xyz = xyz - xyz.mean(0)  # the released pc_normalize: centroid, then max radius 1
        xyz = xyz / np.linalg.norm(xyz, axis=1).max()
        choice = np.random.default_rng(i).choice(len(xyz), n, replace=len(xyz) < n)
        clouds.append(torch.from_numpy(xyz[choice]))
    return torch.stack(clouds)


def _released_features(
    model: ReleasedPointTransformer, proj: PatchToTextProj, pts: Tensor
) -> tuple[Tensor, Tensor]:
    x = pts.transpose(1, 2).clone()
    x[:, [1, 2], :] = x[:, [2, 1], :]  # the released prepare_points y<->z swap
    with torch.no_grad():
        emb, centers, _ = model.forward_patches(x)
        return proj(emb), centers.transpose(1, 2)


# ----------------------------------------------------------------------------------------- tests
def test_released_key_names_and_strict_load(tiny_released: tuple[Path, tuple]) -> None:
    path, (model, proj, _) = tiny_released
    assert sorted(model.state_dict()) == sorted(released_keys(2))  # the test module is the released structure
    assert list(proj.state_dict()) == ["proj.weight", "proj.bias"]
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "released"
    cfg = ckpt.encoder_config
    assert (cfg.trans_dim, cfg.depth, cfg.num_heads, cfg.encoder_dims, cfg.head_dim) == (48, 2, 6, 32, 24)
    assert (cfg.num_groups, cfg.group_size, cfg.norm_eps, cfg.fps_rule) == (16, 8, 1e-5, "pointnet2")
    assert ckpt.logit["form"] == "log_scale" and ckpt.logit["scale"] == pytest.approx(math.log(42.0))
    assert ckpt.text_encoder == "open_clip:ViT-bigG-14@laion2b_s39b_b160k"
    enc = PatchAlignEncoder(cfg)
    own = enc.state_dict()
    assert set(own) == set(ckpt.state) and len(own) == len(released_keys(2)) + 2
    enc.load_state_dict(ckpt.state, strict=True)  # every tensor, names and shapes exactly


def test_full_size_released_file_loads_all_162_tensors(tmp_path: Path) -> None:
    parts = make_released()
    assert len(released_keys(12)) + 2 == 162  # the count: 160 encoder tensors + proj.weight/bias
    path = save_released(tmp_path / "patchalign3d.pt", *parts, num_group=128, group_size=32)
    model = load_pretrained(path)
    assert model.encoder.num_parameters() == sum(p.numel() for p in parts[0].parameters()) + 384 * 1280 + 1280
    assert model.text_encoder_id == "open_clip:ViT-bigG-14@laion2b_s39b_b160k"
    assert model.logit_scale_value == pytest.approx(42.0)  # exp(temp.log_scale), below the clamp


def test_features_equal_the_released_forward_on_real_shapes(tmp_path: Path, shared_data: Path) -> None:
    """Done-when: features of our forward equal the released architecture's to <= 1e-5 on ShapeNetPart."""
    pts = _shapenetpart_points(shared_data)
    model, proj, temp = make_released()
    path = save_released(tmp_path / "patchalign3d.pt", model, proj, temp, num_group=128, group_size=32)
    ref, ref_centers = _released_features(model, proj, pts)
    ours = load_pretrained(path)
    with torch.no_grad():
        out = ours.encoder(pts)
    torch.testing.assert_close(out.centers, ref_centers[..., [0, 2, 1]], atol=0, rtol=0)  # same FPS picks
    diff = (out.patch_features - ref).abs().max().item()
    assert diff <= 1e-5, diff
    # timm's default block eps (1e-6) is measurably further from the released forward
    cfg = ours.encoder.config
    old = PatchAlignEncoder(EncoderConfig(**{**cfg.to_dict(), "norm_eps": 1e-6})).eval()
    old.load_state_dict(ours.encoder.state_dict())
    with torch.no_grad():
        diff_old = (old(pts).patch_features - ref).abs().max().item()
    assert diff_old > 10 * max(diff, 1e-7)
    print(f"max |ours - released| = {diff:.2e} (eps 1e-5), {diff_old:.2e} with eps 1e-6 on {len(pts)} shapes")


def test_export_then_load_pretrained_then_segment_round_trips(tmp_path: Path, shared_data: Path) -> None:
    pts = _shapenetpart_points(shared_data)[:2]
    model, proj, temp = make_released()
    path = save_released(tmp_path / "patchalign3d.pt", model, proj, temp, num_group=128, group_size=32)
    out_dir = export_checkpoint(path, tmp_path / "export")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["text_encoder"] == "open_clip:ViT-bigG-14@laion2b_s39b_b160k"
    assert cfg["logit"]["form"] == "log_scale" and cfg["logit"]["multiplier"] == pytest.approx(42.0)
    assert cfg["templates"] == ["{part}", "a {part}", "{part} part"]
    assert cfg["source_format"] == "released"
    exported = load_pretrained(out_dir)
    direct = load_pretrained(path)
    for k, v in direct.encoder.state_dict().items():
        assert torch.equal(v, exported.encoder.state_dict()[k]), k
    g = torch.Generator().manual_seed(0)
    names = ["seat", "leg", "back"]
    text = F.normalize(torch.randn(3, 1280, generator=g), dim=-1)
    seg = exported.segment(pts, text, normalize=False)
    # the released segmenter: logits = patch_feat @ text.T / tau, argmax per patch, nearest centre per point
    feats, centers = _released_features(model, proj, pts)
    patch_labels = (feats @ text.T).argmax(-1)
    pts_model = pts[..., [0, 2, 1]]
    nearest = torch.cdist(pts_model, centers).argmin(-1)
    expected = torch.gather(patch_labels, 1, nearest)
    assert (seg.labels == expected).float().mean() > 0.999  # cdist ties aside, the same labels
    bank = dict(zip(names, text, strict=True))
    by_name = exported.segment(pts[0], names, text_encoder=bank, normalize=False)
    assert torch.equal(by_name.labels, seg.labels[0])


def _broken(path: Path, tmp: Path, how: str) -> Path:
    obj = torch.load(path, weights_only=True)
    if how == "missing":
        del obj["model"]["blocks.blocks.1.mlp.fc2.bias"]
    else:
        obj["model"]["reduce_dim.weight"] = torch.zeros(48, 31)
    out = tmp / f"{how}.pt"
    torch.save(obj, out)
    return out


@pytest.mark.parametrize("how", ["missing", "misshaped"])
def test_broken_released_file_is_refused_by_every_entry_point(
    tiny_released: tuple[Path, tuple], tmp_path: Path, how: str
) -> None:
    path, _ = tiny_released
    bad = _broken(path, tmp_path, how)
    key = "blocks.1.mlp.fc2.bias" if how == "missing" else "reduce_dim.weight"
    what = "1 missing" if how == "missing" else "1 mis-shaped"
    cfg = EncoderConfig(
        num_groups=16, group_size=8, encoder_dims=32, trans_dim=48, depth=2, num_heads=6, head_dim=24
    )
    if how == "missing":
        with pytest.raises(CheckpointError, match=f"{what}.*{key}"):
            load_pretrained(bad)
        with pytest.raises(CheckpointError, match=f"{what}.*{key}"):
            export_checkpoint(bad, tmp_path / "out")
    else:  # a shape that cannot be the released architecture: refused while reading or loading
        with pytest.raises(CheckpointError, match=key):
            load_pretrained(bad)
        with pytest.raises(CheckpointError, match=key):
            export_checkpoint(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match=f"{what}.*{key}"):
        Stage2Alignment(PatchAlignEncoder(cfg), init_from=str(bad))
    # explicit strict: false loads the rest and says so
    module = Stage2Alignment(PatchAlignEncoder(cfg), init_from=str(bad), init_strict=False)
    assert module.encoder.blocks[0].attn.qkv.weight.shape == (144, 48)
    assert not (tmp_path / "out").exists()


def test_cli_test_accepts_the_released_file_and_refuses_a_broken_one(
    tiny_released: tuple[Path, tuple], tmp_path: Path, shared_data: Path
) -> None:
    """``patchalign test --config configs/eval/shapenetpart.yaml --ckpt_path patchalign3d.pt``."""
    from patchalign.training.cli import cli_main

    root = shared_data / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    if not root.is_dir():
        pytest.skip("real ShapeNetPart shapes not available")
    parts = make_released(trans_dim=48, depth=2, encoder_dims=32, groups=16, size=8, text_dim=384)
    good = save_released(tmp_path / "patchalign3d.pt", *parts, num_group=16, group_size=8)
    arch = {
        "num_groups": 16,
        "group_size": 8,
        "encoder_dims": 32,
        "trans_dim": 48,
        "depth": 2,
        "num_heads": 6,
    }

    def args(ckpt: Path) -> list[str]:
        a = [
            "test",
            "--config",
            str(REPO / "configs" / "eval" / "shapenetpart.yaml"),
            "--ckpt_path",
            str(ckpt),
        ]
        a += ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
        a += ["--data.init_args.root", str(root), "--data.init_args.split", "trainval"]
        a += ["--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2"]
        a += ["--model.init_args.eval_text_encoder", "demo"]
        # no encoder overrides: the architecture is read from the file
        return a + ["--trainer.default_root_dir", str(tmp_path / ckpt.stem)]

    cli = cli_main(args(good))
    assert {k: getattr(cli.model.encoder.config, k) for k in arch} == arch
    assert cli.model.encoder.config.head_dim == 384
    assert torch.equal(cli.model.encoder.head.proj.weight, parts[1].proj.weight)
    assert torch.equal(cli.model.encoder.blocks[1].attn.qkv.weight, parts[0].blocks.blocks[1].attn.qkv.weight)
    assert cli.model.logit_params.multiplier().item() == pytest.approx(42.0)  # the released temperature
    assert any(k.startswith("test/") for k in cli.trainer.callback_metrics)
    bad = _broken(good, tmp_path, "missing")
    with pytest.raises(Exception, match="blocks.1.mlp.fc2.bias"):
        cli_main(args(bad))


def test_released_stage2_trainable_set_and_optimizer_groups() -> None:
    """The released optimiser: encoder 1,873,536 trainable parameters at 1e-4, head + temperature at 5e-4,
    weight decay 0.05 on every group (released stage2.py: AdamW(params, weight_decay=0.05))."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "reference" / "stage2.yaml").read_text())["model"]["init_args"]
    enc_cfg = EncoderConfig(**cfg["encoder"]["init_args"]["config"])
    module = Stage2Alignment(
        PatchAlignEncoder(enc_cfg),
        loss=cfg["loss"],
        temperature=cfg["temperature"],
        trainable=cfg["trainable"],
        freeze_blocks=cfg["freeze_blocks"],
        frozen_train_mode=cfg["frozen_train_mode"],
        optim=cfg["optim"],
    )
    # the released freeze_encoder_except_last_block, applied to the released module structure
    released, proj, _ = make_released()
    for p in released.parameters():
        p.requires_grad = False
    for m in (released.blocks.blocks[-1], released.norm, released.reduce_dim):
        for p in m.parameters():
            p.requires_grad = True
    released.cls_token.requires_grad = released.cls_pos.requires_grad = True
    ref_names = {
        n.replace("blocks.blocks.", "blocks.") for n, p in released.named_parameters() if p.requires_grad
    }
    n_ref = sum(p.numel() for p in released.parameters() if p.requires_grad)
    assert n_ref == 1_873_536
    enc_trainable = {
        n for n, p in module.encoder.named_parameters() if p.requires_grad and not n.startswith("head.")
    }
    assert enc_trainable == ref_names
    module._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = module.configure_optimizers()["optimizer"]
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    enc_ids = {id(named[f"encoder.{n}"]) for n in ref_names}
    head_ids = {id(p) for p in module.encoder.head.parameters()} | {id(module.logit_params.logit_scale)}
    assert set(groups) == enc_ids | head_ids  # nothing else trains
    assert sum(named_p.numel() for named_p in module.parameters() if id(named_p) in enc_ids) == 1_873_536
    assert {groups[i]["lr"] for i in enc_ids} == {1e-4}
    assert {groups[i]["lr"] for i in head_ids} == {5e-4}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05}
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    n_head = sum(p.numel() for p in module.encoder.head.parameters())
    assert n_head == sum(p.numel() for p in proj.parameters()) == 384 * 1280 + 1280
    assert module.logit_params.logit_scale.item() == pytest.approx(
        LearnableTemp().log_scale.item()
    )  # log(1/.07)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [sched.lr_lambdas[0](s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]  # no schedule
    # frozen modules stay in train mode, as the released model.train() leaves them
    module.train()
    assert module.encoder.encoder.training and module.encoder.blocks[0].training


def test_export_verb_on_released_and_broken_files(
    tiny_released: tuple[Path, tuple], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m patchalign export patchalign3d.pt OUT_DIR``: exit 0 and a loadable export; a broken
    file: exit 1, the missing key on stderr, nothing written."""
    from patchalign.__main__ import main

    path, (_, proj, _) = tiny_released
    assert main(["export", str(path), str(tmp_path / "out")]) == 0
    assert torch.equal(load_pretrained(tmp_path / "out").encoder.head.proj.weight, proj.proj.weight)
    bad = _broken(path, tmp_path, "missing")
    assert main(["export", str(bad), str(tmp_path / "bad_out")]) == 1
    assert "blocks.1.mlp.fc2.bias" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()
