"""The PatchAlign3D encoder: released architecture, parameter count, axis convention, outputs."""

import pytest
import torch

from patchalign.grouping import nearest_center
from patchalign.model import EncoderConfig, PatchAlignEncoder, to_model_frame


def _hand_count(cfg: EncoderConfig) -> int:
    """Parameter count of the released architecture worked out layer by layer."""
    e, d, hid = cfg.encoder_dims, cfg.trans_dim, int(cfg.trans_dim * cfg.mlp_ratio)
    mini_pointnet = (
        (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * e + e)
    )
    reduce_dim = e * d + d
    tokens = 2 * d  # cls token + cls pos
    pos_mlp = (3 * 128 + 128) + (128 * d + d)
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (d * hid + hid) + (hid * d + d)  # qkv without bias
    final_norm = 2 * d
    head = d * cfg.head_dim + cfg.head_dim
    return mini_pointnet + reduce_dim + tokens + pos_mlp + cfg.depth * block + final_norm + head


def test_parameter_count_matches_released_checkpoint() -> None:
    model = PatchAlignEncoder(EncoderConfig(head_dim=1280))
    n = model.num_parameters()
    assert n == _hand_count(model.config)
    assert round(n / 1e6, 2) == 22.35
    assert n * 4 / 1e6 == pytest.approx(89.4, abs=0.15)  # the released fp32 file is 89.5 MB with metadata


def test_stage1_head_width() -> None:
    model = PatchAlignEncoder(EncoderConfig(head_dim=768))
    assert model.head.proj.out_features == 768
    assert model.num_parameters() == _hand_count(model.config)


def test_point_bert_parameter_names() -> None:
    keys = set(PatchAlignEncoder(EncoderConfig.tiny()).state_dict())
    for k in [
        "encoder.first_conv.0.weight",
        "encoder.second_conv.3.weight",
        "reduce_dim.weight",
        "cls_token",
        "cls_pos",
        "pos_embed.0.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
    ]:
        assert k in keys, k
    assert "blocks.0.attn.qkv.bias" not in keys


def test_forward_outputs_tiny() -> None:
    cfg = EncoderConfig.tiny(head_dim=24)
    model = PatchAlignEncoder(cfg).eval()
    pts = torch.randn(3, 300, 3)
    out = model(pts)
    assert out.patch_features.shape == (3, cfg.num_groups, 24)
    assert torch.allclose(out.patch_features.norm(dim=-1), torch.ones(3, cfg.num_groups), atol=1e-5)
    assert out.patch_tokens.shape == (3, cfg.num_groups, cfg.trans_dim)
    assert out.group_index.shape == (3, cfg.num_groups, cfg.group_size)
    assert out.cls_token.shape == (3, cfg.trans_dim)
    # centres are input points, reported in the input frame
    centre_pts = torch.gather(pts, 1, out.group_index[:, :, :1].expand(-1, -1, 3))
    assert torch.equal(out.centers, centre_pts)
    assert torch.equal(out.point_to_patch, nearest_center(pts, out.centers))


def test_eval_is_deterministic_and_batch_independent() -> None:
    model = PatchAlignEncoder(EncoderConfig.tiny()).eval()
    pts = torch.randn(4, 256, 3)
    with torch.no_grad():
        full = model(pts).patch_features
        single = torch.cat([model(pts[i : i + 1]).patch_features for i in range(4)])
    assert torch.allclose(full, single, atol=1e-5)


def test_up_axis_is_applied_once_inside_the_model() -> None:
    torch.manual_seed(0)
    y_up = PatchAlignEncoder(EncoderConfig.tiny()).eval()
    z_up = PatchAlignEncoder(EncoderConfig(**{**EncoderConfig.tiny().to_dict(), "up_axis": "z"})).eval()
    z_up.load_state_dict(y_up.state_dict())
    pts_y = torch.randn(2, 256, 3)
    pts_z = pts_y[..., [0, 2, 1]]  # the same shapes stored z-up
    with torch.no_grad():
        a, b = y_up(pts_y), z_up(pts_z)
    assert torch.allclose(a.patch_features, b.patch_features, atol=1e-5)
    assert torch.equal(a.centers, b.centers[..., [0, 2, 1]])
    assert torch.equal(to_model_frame(to_model_frame(pts_y, "x"), "x"), pts_y)


def test_rejects_bad_input() -> None:
    model = PatchAlignEncoder(EncoderConfig.tiny())
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        model(torch.randn(10, 3))
    with pytest.raises(ValueError, match="at least"):
        model(torch.randn(1, 4, 3))


def test_training_step_backpropagates_to_every_parameter() -> None:
    model = PatchAlignEncoder(EncoderConfig.tiny()).train()
    out = model(torch.randn(2, 200, 3))
    out.patch_features.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_config_round_trip() -> None:
    cfg = EncoderConfig.tiny(head_dim=7)
    assert EncoderConfig.from_dict({**cfg.to_dict(), "unknown_future_key": 1}) == cfg


def test_released_numerics_are_the_defaults_and_legacy_configs_keep_theirs() -> None:
    cfg = EncoderConfig()
    assert (cfg.norm_eps, cfg.fps_rule, cfg.fps_start) == (1e-5, "pointnet2", 0)
    enc = PatchAlignEncoder(EncoderConfig.tiny())
    assert all(b.norm1.eps == 1e-5 and b.norm2.eps == 1e-5 for b in enc.blocks) and enc.norm.eps == 1e-5
    old = {k: v for k, v in EncoderConfig.tiny().to_dict().items() if k not in ("norm_eps", "fps_rule")}
    legacy = EncoderConfig.from_dict(old)  # written before the fields existed: trained with these
    assert (legacy.norm_eps, legacy.fps_rule) == (1e-6, "pytorch3d")
    assert PatchAlignEncoder(legacy).blocks[0].norm1.eps == 1e-6
    # the FPS rule reaches the grouping: a cloud with points in the skipped ball picks other centres
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(1, 256, 3, generator=g) * 0.005  # |p|^2 ~ 1e-4: inside the skipped ball
    pts[0, :8] = torch.randn(8, 3, generator=g) + 2.0  # 8 far points for 16 patches
    a = PatchAlignEncoder(EncoderConfig.tiny()).eval()
    b = PatchAlignEncoder(EncoderConfig(**{**EncoderConfig.tiny().to_dict(), "fps_rule": "pytorch3d"})).eval()
    ca, cb = a(pts).centers, b(pts).centers
    # pointnet2: the 8 far points, then index 0 (far too) once only skipped points remain;
    # pytorch3d goes on into the ball
    assert bool(((ca[0] ** 2).sum(-1) > 1e-3).all())
    assert int(((cb[0] ** 2).sum(-1) <= 1e-3).sum()) == 8


@pytest.mark.parametrize("train", [False, True])
def test_fast_tokenizer_equals_point_bert_formulation(train: bool) -> None:
    from patchalign.model import MiniPointNet

    net = MiniPointNet(64).train(train)
    neigh = torch.randn(2, 5, 8, 3)
    if not train:  # non-trivial running statistics
        for bn in (net.first_conv[1], net.second_conv[1]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    fast = net(neigh)
    ref = net.forward_reference(neigh)
    assert torch.allclose(fast, ref, atol=1e-5)
    if not train:  # the folded-BatchNorm, chunked inference path (chunks smaller than the batch)
        net.inference_chunk_points = 16
        with torch.no_grad():
            folded = net(neigh)
        assert torch.allclose(folded, ref.detach(), atol=1e-5)
