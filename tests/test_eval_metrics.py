"""mIoU conventions against hand-worked numbers, DDP-style merging and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from patchalign.eval.metrics import CONVENTIONS, PartSegIoU, per_shape_miou

# Four shapes, 6 points each. Category A has 3 parts, category B has 2. -1 = unlabelled.
#
# s1 (A) gt   [0,0,1,1,1,1]  pred [0,1,1,1,2,2]
#     part0: I=1 U=2 -> 1/2     part1: I=2 (pts 2,3) U=5 (pts 1..5) -> 2/5
#     part2: absent from gt, predicted at pts 4,5: I=0 U=2
#     released: mean(1/2, 2/5)        = 0.45  (part2 skipped: absent from gt)
#     pointbert: mean(1/2, 2/5, 0)    = 0.30  (predicted but absent -> 0)
#     find3d:    mean(1/2, 2/5, 0)    = 0.30  (union 2 > 0 -> counted)
# s2 (A) gt = pred = [0,0,0,1,1,1]: parts 0,1 IoU 1; part2 absent from both
#     released 1 (part2 skipped), pointbert 1 (part2 -> 1), find3d 1 (part2 empty union, skipped)
# s3 (B) gt [0,0,0,0,-1,-1]  pred [0,0,1,1,0,1]
#     part0: I=2; union over labelled pts {0,1,2,3} = 4 -> 0.5; union incl. unlabelled {0..4} = 5 -> 0.4
#     part1: absent from gt; predicted at labelled pts 2,3 and unlabelled pt 5
#     released: 0.5                    pointbert: mean(0.5, 0) = 0.25
#     find3d:   mean(0.4, 0) = 0.20    (Find3D counts unlabelled points predicted as a part)
# s4 (B) gt all -1, pred all 0
#     released: no gt part -> shape skipped
#     pointbert: both parts have an empty (labelled) union -> 1, 1 -> 1.0
#     find3d: part0 union = 6 (all predicted), I=0 -> 0; part1 empty -> skipped -> 0.0
PREDS = torch.tensor([[0, 1, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
GT = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1], [-1, -1, -1, -1, -1, -1]])
CATS = ["A", "A", "B", "B"]
PARTS = {"A": 3, "B": 2}
NAN = float("nan")
SHAPE_EXPECTED = [[0.45, 0.30, 0.30], [1.0, 1.0, 1.0], [0.5, 0.25, 0.20], [NAN, 1.0, 0.0]]


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_per_shape_hand_worked() -> None:
    got = per_shape_miou(PREDS, GT, torch.tensor([3, 3, 2, 2]))
    assert got.shape == (4, 3)
    for row, exp in zip(got.tolist(), SHAPE_EXPECTED, strict=True):
        assert all(_close(a, b) for a, b in zip(row, exp, strict=True)), (row, exp)


def test_metric_instance_and_category_hand_worked() -> None:
    m = PartSegIoU(["A", "B", "C"], PARTS | {"C": 4})
    m.update(PREDS, GT, CATS)
    r = m.compute()
    # released: A shapes 0.45, 1.0; B shape 0.5 (s4 skipped)
    assert r["released/instance_mIoU"].item() == pytest.approx((0.45 + 1.0 + 0.5) / 3)
    assert r["released/category_mIoU"].item() == pytest.approx((0.725 + 0.5) / 2)
    # pointbert: A 0.30, 1.0; B 0.25, 1.0
    assert r["pointbert/instance_mIoU"].item() == pytest.approx(2.55 / 4)
    assert r["pointbert/category_mIoU"].item() == pytest.approx((0.65 + 0.625) / 2)
    # find3d: A 0.30, 1.0; B 0.20, 0.0
    assert r["find3d/instance_mIoU"].item() == pytest.approx(1.5 / 4)
    assert r["find3d/category_mIoU"].item() == pytest.approx((0.65 + 0.10) / 2)
    # category C has no shape: NaN per category, left out of the category mean
    for conv in CONVENTIONS:
        assert math.isnan(r[f"{conv}/per_category"][2].item())
    assert r["num_shapes"].tolist() == [2, 2, 0]
    # accuracy over labelled points: s1 3/6, s2 6/6, s3 2/4, s4 no labelled point
    assert r["accuracy"].item() == pytest.approx(11 / 16)
    assert r["per_category_accuracy"][0].item() == pytest.approx(9 / 12)
    assert r["per_category_accuracy"][1].item() == pytest.approx(2 / 4)


def test_metric_is_batch_size_and_split_invariant() -> None:
    """Sum states: any batching, or per-rank metrics merged as DDP would, give the same numbers."""
    whole = PartSegIoU(["A", "B"], PARTS)
    whole.update(PREDS, GT, CATS)
    rank0, rank1 = PartSegIoU(["A", "B"], PARTS), PartSegIoU(["A", "B"], PARTS)
    rank0.update(PREDS[:1], GT[:1], CATS[:1])
    rank0.update(PREDS[3:], GT[3:], CATS[3:])
    rank1.update(PREDS[1:3], GT[1:3], CATS[1:3])
    rank0.merge_state(rank1)
    a, b = whole.compute(), rank0.compute()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), equal_nan=True), k


def test_metric_keeps_per_shape_records() -> None:
    m = PartSegIoU(["A", "B"], PARTS, keep_per_shape=True)
    m.update(PREDS[:2], GT[:2], CATS[:2], shape_ids=torch.tensor([10, 11]))
    m.update(PREDS[2:], GT[2:], torch.tensor([1, 1]), num_parts=[2, 2], shape_ids=torch.tensor([12, 13]))
    miou, cat, ids = m.per_shape()
    assert ids.tolist() == [10, 11, 12, 13]
    assert cat.tolist() == [0, 0, 1, 1]
    assert all(
        _close(a, b)
        for row, exp in zip(miou.tolist(), SHAPE_EXPECTED, strict=True)
        for a, b in zip(row, exp, strict=True)
    )


def test_metric_bad_input() -> None:
    m = PartSegIoU(["A", "B"], PARTS)
    with pytest.raises(KeyError, match="not one of"):
        m.update(PREDS, GT, ["A", "A", "B", "Z"])
    with pytest.raises(ValueError, match="lie in"):
        m.update(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]), ["B"])  # part 5 of a 2-part category
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        m.update(PREDS[0], GT[0], ["A"])
    with pytest.raises(ValueError, match="no part count"):
        PartSegIoU(["A", "X"]).update(PREDS[:1], GT[:1], ["A"])
    with pytest.raises(ValueError, match="categories"):
        PartSegIoU([])


def test_evaluator_single_category_report() -> None:
    """One category: torchmetrics squeezes (1,) outputs; rows and log keys must still be right."""
    from patchalign.eval.evaluator import PartSegEvaluator

    ev = PartSegEvaluator(["A"], {"A": ["x", "y", "z"]}, uids=["s1", "s2"])
    ev.update(PREDS[:2], GT[:2], CATS[:2], shape_ids=torch.tensor([0, 1]))
    rep = ev.compute()
    assert len(rep.rows) == 1 and rep.rows[0]["num_shapes"] == 2
    assert rep.rows[0]["released"] == pytest.approx((0.45 + 1.0) / 2)
    assert set(rep.log_dict("test/")) == {
        f"test/{c}/{k}_mIoU" for c in CONVENTIONS for k in ("instance", "category")
    } | {"test/accuracy"}
    assert [s["uid"] for s in rep.per_shape] == ["s1", "s2"]
