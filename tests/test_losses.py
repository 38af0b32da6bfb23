"""Stage 1 and Stage 2 losses against hand-worked values and reference implementations."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from patchalign.losses import (
    ScaleLogitParams,
    SigmoidLogitParams,
    cosine_distillation_loss,
    logit_multiplier,
    per_shape_bce_loss,
    sigmoid_patch_text_loss,
)


def test_cosine_loss_by_hand() -> None:
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    target = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    # 1 - cos: 0, 1, 2
    assert cosine_distillation_loss(pred, target).item() == pytest.approx(1.0)
    mask = torch.tensor([True, True, False])
    assert cosine_distillation_loss(pred, target, mask).item() == pytest.approx(0.5)
    empty = cosine_distillation_loss(pred.requires_grad_(), target, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()


def test_siglip_parity_with_open_clip_forward_and_backward() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 9, 16
    img = F.normalize(torch.randn(n, c, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, c, generator=g), dim=-1)
    params = SigmoidLogitParams()
    assert params.logit_scale.item() == pytest.approx(math.log(10)) and params.logit_bias.item() == -10

    img1, txt1 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ours = sigmoid_patch_text_loss(img1, txt1, torch.eye(n), params.logit_scale, params.logit_bias)
    ours.backward()

    ref_scale = torch.tensor(math.log(10.0), requires_grad=True)
    ref_bias = torch.tensor(-10.0, requires_grad=True)
    img2, txt2 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = SigLipLoss()(img2, txt2, ref_scale.exp(), ref_bias)
    ref.backward()

    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(img1.grad, img2.grad, atol=1e-6)
    assert torch.allclose(txt1.grad, txt2.grad, atol=1e-6)
    assert params.logit_scale.grad.item() == pytest.approx(ref_scale.grad.item(), rel=1e-5)
    assert params.logit_bias.grad.item() == pytest.approx(ref_bias.grad.item(), rel=1e-5)


def test_siglip_fractional_targets_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.25, 0.0]])
    scale, bias = torch.tensor(math.log(2.0)), torch.tensor(-1.0)
    l1, l2 = 2 * 1 - 1, 2 * 0 - 1  # logits
    expected = -(0.25 * math.log(1 / (1 + math.exp(-l1))) + 0.75 * math.log(1 / (1 + math.exp(l1))))
    expected += -math.log(1 / (1 + math.exp(l2)))
    assert sigmoid_patch_text_loss(z, t, y, scale, bias).item() == pytest.approx(expected, rel=1e-6)


def test_siglip_patch_mask_and_shape_check() -> None:
    z = F.normalize(torch.randn(4, 8), dim=-1)
    t = F.normalize(torch.randn(3, 8), dim=-1)
    y = torch.rand(4, 3)
    s, b = torch.tensor(1.0), torch.tensor(-2.0)
    mask = torch.tensor([True, False, True, False])
    masked = sigmoid_patch_text_loss(z, t, y, s, b, patch_mask=mask)
    assert masked.item() == pytest.approx(sigmoid_patch_text_loss(z[mask], t, y[mask], s, b).item(), rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        sigmoid_patch_text_loss(z, t, y.T, s, b)


def test_per_shape_bce_matches_torch_reference_loop() -> None:
    g = torch.Generator().manual_seed(2)
    bsz, groups, labels, c = 3, 5, 4, 8
    z = F.normalize(torch.randn(bsz, groups, c, generator=g), dim=-1)
    t = F.normalize(torch.randn(bsz, labels, c, generator=g), dim=-1)
    y = torch.rand(bsz, groups, labels, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    params = ScaleLogitParams(log_param=False)
    assert params.logit_scale.item() == pytest.approx(1 / 0.07)
    got = per_shape_bce_loss(z, t, y, mask, params.logit_scale)
    per_shape = []
    for i in range(bsz):
        k = int(mask[i].sum())
        logits = params.logit_scale.detach() * z[i] @ t[i, :k].T
        pw = torch.full((k,), float(max(1, k - 1)))
        per_shape.append(F.binary_cross_entropy_with_logits(logits, y[i, :, :k], pos_weight=pw))
    assert got.item() == pytest.approx(torch.stack(per_shape).mean().item(), rel=1e-5)


def test_released_log_scale_temperature() -> None:
    # Released LearnableTemp(init_tau=0.07, mode="exp"): log_scale = log(1/0.07), scale = exp(.).clamp(100).
    params = ScaleLogitParams()
    assert params.form == "log_scale"
    assert params.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert params.multiplier().item() == pytest.approx(1 / 0.07, rel=1e-6)
    cos = torch.tensor([0.5, -0.25])
    torch.testing.assert_close(params(cos), cos / 0.07)
    assert ScaleLogitParams(init_scale=500.0).multiplier().item() == 100.0
    # the loss with form="log_scale" equals the linear form at the exponentiated value
    g = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(2, 3, 8, generator=g), dim=-1)
    y = torch.rand(2, 4, 3, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    s = torch.tensor(math.log(20.0), requires_grad=True)
    a = per_shape_bce_loss(z, t, y, mask, s, form="log_scale")
    b = per_shape_bce_loss(z, t, y, mask, torch.tensor(20.0), form="scale")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    a.backward()
    assert s.grad is not None and s.grad.abs() > 0
    with pytest.raises(ValueError, match="unknown logit form"):
        logit_multiplier("exp", 1.0)  # type: ignore[arg-type]


def test_scale_is_clamped_at_100() -> None:
    params = ScaleLogitParams(init_scale=500.0, log_param=False)
    assert params(torch.tensor(1.0)).item() == 100.0
    z = F.normalize(torch.randn(1, 2, 4), dim=-1)
    t = z[:, :1].clone()
    y = torch.tensor([[[1.0], [0.0]]])
    a = per_shape_bce_loss(z, t, y, torch.ones(1, 1, dtype=torch.bool), torch.tensor(500.0))
    b = per_shape_bce_loss(z, t, y, torch.ones(1, 1, dtype=torch.bool), torch.tensor(100.0))
    assert a.item() == pytest.approx(b.item())
