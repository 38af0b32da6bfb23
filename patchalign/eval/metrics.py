"""Part-segmentation mIoU under the three conventions papers report, as a ``torchmetrics.Metric``.

Papers in this area report "mIoU" with different rules for parts that are absent from a shape, so
numbers are only comparable under the same rule. We compute all three side by side:

``released`` (PatchAlign3D's released ``eval.py``)
    A part absent from the shape's ground truth is skipped; shape mIoU = mean over the remaining
    parts; a shape with no ground-truth part at all is skipped.
``pointbert`` (Point-BERT / PointNet++ / DGCNN ShapeNetPart standard)
    Every part of the category counts: absent from both prediction and ground truth -> IoU 1;
    predicted but absent from the ground truth -> IoU 0.
``find3d`` (Find3D's ``compute_3d_iou_upsample``)
    A part whose union is empty is skipped. Unlabelled ground-truth points (``-1``) that are
    predicted as a part *do* enter that part's union, as Find3D's label 0 does.

For ``released`` and ``pointbert`` unlabelled points (``-1``) are ignored entirely. A prediction of
``-1`` means "no part". Instance mIoU is the mean of shape mIoUs; category mIoU the mean over
categories of the per-category mean (categories without shapes are left out).

Everything is accumulated in per-category *sum* states, so DDP reduction is a plain all-reduce and
the result does not depend on the batch size (the released script averages per-batch category
means, which does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from patchalign.training.metrics import CONVENTIONS, per_shape_miou


class PartSegIoU(Metric):
    """Instance and category mIoU under :data:`CONVENTIONS`, plus point accuracy.

    Args:
        categories: every category that can occur, in report order (fixes the state size).
        parts_per_category: part count per category, used when :meth:`update` gets no ``num_parts``.
        keep_per_shape: also keep each shape's mIoU, category and id (``cat`` states) for best/worst
            reports; costs 4 numbers per shape.

    ``compute()`` returns a flat dict of tensors: ``"<conv>/instance_mIoU"``,
    ``"<conv>/category_mIoU"``, ``"<conv>/per_category"`` (``(C,)``, NaN for empty categories),
    ``"accuracy"``, ``"per_category_accuracy"`` and ``"num_shapes"`` (``(C,)``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        categories: Sequence[str],
        parts_per_category: Mapping[str, int] | None = None,
        keep_per_shape: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not categories:
            raise ValueError("categories must not be empty")
        if len(set(categories)) != len(categories):
            raise ValueError("categories must be unique")
        self.categories = list(categories)
        self._cat_index = {c: i for i, c in enumerate(self.categories)}
        self.parts_per_category = dict(parts_per_category or {})
        self.keep_per_shape = keep_per_shape
        c = len(self.categories)
        n_conv = len(CONVENTIONS)
        self.add_state("iou_sum", torch.zeros(n_conv, c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("shape_count", torch.zeros(n_conv, c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        if keep_per_shape:
            self.add_state("shape_miou", [], dist_reduce_fx="cat")
            self.add_state("shape_category", [], dist_reduce_fx="cat")
            self.add_state("shape_id", [], dist_reduce_fx="cat")

    def category_indices(self, category: Sequence[str] | Tensor) -> Tensor:
        if isinstance(category, Tensor):
            return category.to(self.device).long().reshape(-1)
        try:
            return torch.tensor([self._cat_index[c] for c in category], device=self.device, dtype=torch.long)
        except KeyError as e:
            raise KeyError(
                f"category {e.args[0]!r} is not one of the metric's categories {self.categories}"
            ) from None

    def update(
        self,
        preds: Tensor,
        target: Tensor,
        category: Sequence[str] | Tensor,
        num_parts: Tensor | Sequence[int] | None = None,
        shape_ids: Tensor | None = None,
    ) -> None:
        """Add a batch: ``preds``/``target`` ``(B, N)`` local ids, ``category`` names or indices ``(B,)``."""
        if preds.dim() != 2 or preds.shape != target.shape:
            raise ValueError(
                f"preds and target must both be (B, N), got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        cat_idx = self.category_indices(category)
        if cat_idx.shape[0] != preds.shape[0]:
            raise ValueError(f"got {cat_idx.shape[0]} categories for {preds.shape[0]} shapes")
        if num_parts is None:
            try:
                num_parts = [self.parts_per_category[self.categories[i]] for i in cat_idx.tolist()]
            except KeyError as e:
                raise ValueError(f"no part count for category {e.args[0]!r}: pass num_parts") from None
        num_parts_t = torch.as_tensor(num_parts, device=preds.device).long()
        preds, target = preds.long(), target.long()
        miou = per_shape_miou(preds, target, num_parts_t).to(self.iou_sum.device)  # (B, 3)
        valid = ~miou.isnan()
        for j in range(len(CONVENTIONS)):
            self.iou_sum[j].index_add_(
                0, cat_idx, torch.where(valid[:, j], miou[:, j], torch.zeros_like(miou[:, j]))
            )
            self.shape_count[j].index_add_(0, cat_idx, valid[:, j].long())
        labelled = target >= 0
        self.correct.index_add_(0, cat_idx, ((preds == target) & labelled).sum(1).to(self.correct.device))
        self.total.index_add_(0, cat_idx, labelled.sum(1).to(self.total.device))
        if self.keep_per_shape:
            if shape_ids is None:
                shape_ids = torch.full((preds.shape[0],), -1, dtype=torch.long)
            self.shape_miou.append(miou)
            self.shape_category.append(cat_idx)
            self.shape_id.append(torch.as_tensor(shape_ids, device=cat_idx.device).long().reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for j, conv in enumerate(CONVENTIONS):
            count = self.shape_count[j]
            per_cat = self.iou_sum[j] / count.clamp_min(1)
            per_cat = torch.where(count > 0, per_cat, torch.full_like(per_cat, float("nan")))
            out[f"{conv}/instance_mIoU"] = self.iou_sum[j].sum() / count.sum().clamp_min(1)
            present = count > 0
            out[f"{conv}/category_mIoU"] = (
                per_cat[present].mean() if present.any() else torch.tensor(float("nan"), dtype=per_cat.dtype)
            )
            out[f"{conv}/per_category"] = per_cat
        out["accuracy"] = self.correct.sum().double() / self.total.sum().clamp_min(1)
        acc = self.correct.double() / self.total.clamp_min(1)
        out["per_category_accuracy"] = torch.where(self.total > 0, acc, torch.full_like(acc, float("nan")))
        out["num_shapes"] = self.shape_count[CONVENTIONS.index("pointbert")].clone()
        return out

    def per_shape(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(miou (M, 3), category index (M,), shape id (M,))`` of every shape seen (synced)."""
        if not self.keep_per_shape:
            raise RuntimeError("construct the metric with keep_per_shape=True to record shapes")

        def cat(x: Tensor | list[Tensor], dtype: torch.dtype, width: int | None = None) -> Tensor:
            if isinstance(x, Tensor):
                return x
            if not x:
                return torch.zeros((0, width) if width else (0,), dtype=dtype)
            return torch.cat(x)

        with self.sync_context():  # no-op outside torch.distributed
            return (
                cat(self.shape_miou, torch.float64, 3),
                cat(self.shape_category, torch.long),
                cat(self.shape_id, torch.long),
            )

    def scalars(self, results: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """The scalar entries of :meth:`compute` (for ``LightningModule.log_dict``)."""
        results = self.compute() if results is None else results
        return {
            k: float(v)
            for k, v in results.items()
            if k.endswith(("_mIoU", "accuracy")) and "per_category" not in k
        }
