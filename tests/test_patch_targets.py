"""match_patch_targets: the released nearest-stored-centre lookup, against hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from patchalign.patch_targets import match_patch_targets


def test_hand_worked_nearest_centre() -> None:
    # Stored centres on the x axis at 0, 1, 3; features chosen so each is identifiable.
    stored = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]]])
    feats = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [3.0, 4.0]]], dtype=torch.float16)
    # Predicted: 0.4 -> centre 0 (0.4 < 0.6); 0.6 -> centre 1; 2.1 -> centre 2 (0.9 < 1.1);
    # (1, 5, 0) -> distances 5.10, 5.0, 5.39 -> centre 1.
    pred = torch.tensor([[[0.4, 0, 0], [0.6, 0, 0], [2.1, 0, 0], [1.0, 5.0, 0]]])
    tgt, mask = match_patch_targets(pred, stored, feats)
    expected = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]]])
    assert tgt.dtype == torch.float32 and tgt.shape == (1, 4, 2)
    torch.testing.assert_close(tgt, expected)
    assert mask.tolist() == [[True, True, True, True]]


def test_padding_centres_never_match_and_zero_features_are_masked() -> None:
    nan = math.nan
    # Shape 0: the closest stored row is padding (NaN) and must be skipped; shape 1: only padding.
    stored = torch.tensor(
        [
            [[nan, nan, nan], [5.0, 0, 0], [0.0, 0, 1.0]],
            [[nan, nan, nan], [nan, nan, nan], [nan, nan, nan]],
        ]
    )
    feats = torch.tensor(
        [
            [[9.0, 9.0], [1.0, 0.0], [0.0, 0.0]],  # row 2 has no teacher feature
            [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
        ]
    )
    pred = torch.tensor([[[4.0, 0, 0], [0.0, 0, 0.9]], [[0.0, 0, 0], [1.0, 1, 1]]])
    tgt, mask = match_patch_targets(pred, stored, feats)
    torch.testing.assert_close(tgt[0, 0], torch.tensor([1.0, 0.0]))
    assert mask.tolist() == [[True, False], [False, False]]


def test_batched_equals_per_shape_loop_of_released_rule() -> None:
    g = torch.Generator().manual_seed(0)
    b, g_pred, g0, c = 3, 17, 11, 8
    pred = torch.randn(b, g_pred, 3, generator=g)
    stored = torch.randn(b, g0, 3, generator=g)
    feats = torch.randn(b, g0, c, generator=g).half()
    tgt, mask = match_patch_targets(pred, stored, feats)
    for i in range(b):  # independent per-shape loop: squared distances, argmin, normalise
        d2 = ((pred[i][:, None, :] - stored[i][None, :, :]) ** 2).sum(-1)
        ref = feats[i].float()[d2.argmin(-1)]
        ref = ref / ref.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(tgt[i], ref)
    assert mask.all()


def test_shape_errors_are_one_clear_line() -> None:
    with pytest.raises(ValueError, match="stored_features"):
        match_patch_targets(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="batch sizes"):
        match_patch_targets(torch.zeros(2, 2, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, 8))
