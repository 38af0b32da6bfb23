"""Evaluation driver: a metric wrapper for LightningModules and the script path ``run_zero_shot_eval``.

Inside Lightning::

    # setup / on_test_epoch_start
    self.evaluator = PartSegEvaluator.from_dataset(self.trainer.datamodule.test_dataset).to(self.device)
    # test_step
    pred = zero_shot_predict(self.encoder, batch, self.embedder)
    self.evaluator.update_batch(pred.labels, batch)
    # on_test_epoch_end
    report = self.evaluator.compute()
    self.log_dict(report.log_dict("test/"))
    if self.trainer.is_global_zero: print(report.format_table()); report.save(out_dir)

From a script: ``run_zero_shot_eval(model, dataset, text_encoder_or_bank, batch_size=32)``.

Both paths put the talk's number for the benchmark (:mod:`patchalign.eval.references`) beside ours:
the evaluator carries the benchmark key (``EvalDataModule`` sets it on its dataset), the report
prints ``ours | talk | delta`` under the table, and ``save`` writes it into ``results.json``
(``info.comparison``) and ``comparison.csv``, with the seconds per shape end to end (from the
evaluator's construction, i.e. the test epoch's start, to the final metric: file reading, sampling,
encoder, text encoding, label transfer and metric all included).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from patchalign.eval.metrics import CONVENTIONS, PartSegIoU
from patchalign.eval.protocol import ResampledDataset, collate_part_samples
from patchalign.eval.readers import PartSegDataset
from patchalign.eval.references import compare_part_segmentation, get_reference
from patchalign.losses import DEFAULT_LOGIT_SCALE
from patchalign.pretrained import AssignMode, Segmentation, assign_point_labels
from patchalign.text import PartTextEmbedder

log = logging.getLogger(__name__)

TextSource = Any  # a text encoder (``.encode``), a ``{name: vector}`` mapping or a TextBank


def zero_shot_predict(
    encoder: nn.Module,
    batch: Mapping[str, Any],
    embedder: PartTextEmbedder,
    assign: AssignMode = "nearest",
    k: int = 3,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    none_threshold: float | None = None,
) -> Segmentation:
    """The zero-shot protocol on a collated batch (``points``, ``part_names``, ``category``).

    1. **Names and prompts**: each part name is expanded with prompt templates, encoded,
       L2-normalised and averaged per name (:class:`~patchalign.text.PartTextEmbedder`; presets
       ``part_only``, the released default, ``part_plus_cat``, ``ensemble`` and ``find3d``).
    2. **Patch scores**: cosine similarity of every patch with the names of the shape's *own*
       category only (released: logits outside the category masked to ``-1e4``).
    3. **Points**: each point takes its nearest patch centre's label (released default), a
       distance-weighted vote of its ``k`` nearest centres, or the mean logits of the patches whose
       kNN group contains it (released ``--assign membership``); see
       :func:`~patchalign.pretrained.assign_point_labels`.

    Reproduces the released ``inference/eval.py`` (dickoah/PatchAlign3D, arXiv 2601.02457). The
    points must already be on the encoder's device.
    """
    points = batch["points"]
    out = encoder(points)
    text, mask = embedder.batch(batch["part_names"], batch["category"])
    pred = assign_point_labels(
        out.patch_features,
        text.to(points.device),
        points,
        out.centers,
        out.point_to_patch,
        mask.to(points.device),
        group_index=out.group_index,
        assign=assign,
        k=k,
        logit_scale=logit_scale,
        none_threshold=none_threshold,
    )
    pred.encoding = out
    return pred


@dataclass
class EvalReport:
    """Everything one evaluation produced, ready to print, save and log.

    Attributes:
        scalars: ``"<conv>/instance_mIoU"``, ``"<conv>/category_mIoU"`` (0..1), ``"accuracy"``.
        rows: one dict per category: ``category``, ``num_shapes``, ``<conv>`` mIoU per convention,
            ``accuracy`` (NaN when the category had no shape).
        per_shape: ``{"shape_id", "uid", "category", <conv>: mIoU}`` per evaluated shape.
        info: provenance (dataset, split sizes, missing shapes, protocol settings, timing).
    """

    scalars: dict[str, float]
    rows: list[dict[str, Any]]
    per_shape: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.scalars.items()}

    def format_table(self) -> str:
        """Per-category table with the three conventions side by side (mIoU in %)."""
        head = f"{'category':<16}{'shapes':>7}" + "".join(f"{c:>11}" for c in CONVENTIONS) + f"{'acc':>8}"
        lines = [head, "-" * len(head)]

        def pct(x: float) -> str:
            return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"

        for r in self.rows:
            lines.append(
                f"{r['category'][:15]:<16}{r['num_shapes']:>7}"
                + "".join(f"{pct(r[c]):>11}" for c in CONVENTIONS)
                + f"{pct(r['accuracy']):>8}"
            )
        lines.append("-" * len(head))
        n = sum(r["num_shapes"] for r in self.rows)
        lines.append(
            f"{'category mIoU':<16}{n:>7}"
            + "".join(f"{pct(self.scalars[f'{c}/category_mIoU']):>11}" for c in CONVENTIONS)
        )
        lines.append(
            f"{'instance mIoU':<16}{n:>7}"
            + "".join(f"{pct(self.scalars[f'{c}/instance_mIoU']):>11}" for c in CONVENTIONS)
            + f"{pct(self.scalars['accuracy']):>8}"
        )
        comparison = self.format_comparison()
        if comparison:
            lines += ["", comparison]
        return "\n".join(lines)

    def format_comparison(self) -> str:
        """``ours | talk | delta`` lines for the benchmark's talk row, and the seconds per shape."""

        def fmt(x: float | None, sign: bool = False) -> str:
            return "-" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")

        lines = []
        ref = self.info.get("reference")
        if ref:
            note = "" if ref.get("confirmed") else ", convention not confirmed by released code"
            lines.append(f"vs the talk: {ref['title']} ({ref['convention']} convention{note})")
            lines.append(f"{'metric':<16}{'ours':>9}{'talk':>9}{'delta':>9}")
            for row in self.info.get("comparison", []):
                lines.append(
                    f"{row['metric']:<16}{fmt(row['ours']):>9}{fmt(row['talk']):>9}"
                    f"{fmt(row['delta'], sign=True):>9}"
                )
        sps = self.info.get("seconds_per_shape")
        if sps is not None:
            lines.append(
                f"seconds per shape (end to end): {sps:.4f} ({self.info.get('num_shapes', 0)} shapes, "
                f"{self.info.get('seconds_end_to_end', self.info.get('seconds', 0.0)):.1f} s)"
            )
        return "\n".join(lines)

    def set_reference(self, key: str | None) -> None:
        """Record the talk row ``key`` (or none) and the comparison of ours against it in ``info``."""
        self.info.pop("reference", None)
        self.info.pop("comparison", None)
        self.info["benchmark"] = key
        if key is None:
            return
        ref = get_reference(key)
        self.info["reference"] = ref.as_dict()
        self.info["comparison"] = compare_part_segmentation(self.scalars, ref)

    def comparison_to_csv(self, path: str | Path) -> Path | None:
        """One row per talk metric: benchmark, metric, convention, ours, talk, delta (percent) and
        the seconds per shape; ``None`` (nothing written) without a talk row."""
        if not self.info.get("comparison"):
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = [
            "benchmark",
            "metric",
            "convention",
            "ours",
            "talk",
            "delta",
            "num_shapes",
            "seconds_per_shape",
        ]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for row in self.info["comparison"]:
                w.writerow(
                    {
                        "benchmark": self.info["benchmark"],
                        **row,
                        "num_shapes": self.info.get("num_shapes"),
                        "seconds_per_shape": self.info.get("seconds_per_shape"),
                    }
                )
        return path

    def to_csv(self, path: str | Path) -> Path:
        """Per-category rows plus the two summary rows (``ALL (category)``, ``ALL (instance)``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = ["category", "num_shapes", *CONVENTIONS, "accuracy"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r[k] for k in fields})
            n = sum(r["num_shapes"] for r in self.rows)
            w.writerow(
                {
                    "category": "ALL (category)",
                    "num_shapes": n,
                    **{c: self.scalars[f"{c}/category_mIoU"] for c in CONVENTIONS},
                    "accuracy": "",
                }
            )
            w.writerow(
                {
                    "category": "ALL (instance)",
                    "num_shapes": n,
                    **{c: self.scalars[f"{c}/instance_mIoU"] for c in CONVENTIONS},
                    "accuracy": self.scalars["accuracy"],
                }
            )
        return path

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def clean(x: Any) -> Any:  # JSON has no NaN
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        path.write_text(json.dumps(clean(asdict(self)), indent=2))
        return path

    def save(self, out_dir: str | Path, stem: str = "results") -> tuple[Path, Path]:
        """``<stem>.csv`` and ``<stem>.json`` (returned), plus ``comparison.csv`` with a talk row."""
        out_dir = Path(out_dir)
        paths = self.to_csv(out_dir / f"{stem}.csv"), self.to_json(out_dir / f"{stem}.json")
        self.comparison_to_csv(
            out_dir / ("comparison.csv" if stem == "results" else f"{stem}_comparison.csv")
        )
        return paths

    def best_worst(
        self, convention: str = "released", k: int = 1
    ) -> dict[str, tuple[list[dict], list[dict]]]:
        """Per category, the ``k`` best and ``k`` worst shapes under ``convention`` (skipped shapes
        excluded)."""
        by_cat: dict[str, list[dict]] = {}
        for s in self.per_shape:
            v = s.get(convention)
            if v is not None and not math.isnan(v):
                by_cat.setdefault(s["category"], []).append(s)
        out = {}
        for cat, shapes in by_cat.items():
            ordered = sorted(shapes, key=lambda s: s[convention])
            out[cat] = (ordered[::-1][:k], ordered[:k])
        return out


class PartSegEvaluator(nn.Module):
    """A :class:`PartSegIoU` plus the bookkeeping that turns it into an :class:`EvalReport`.

    An ``nn.Module`` so a LightningModule can own it and Lightning moves its states to the device;
    the states are sum/cat states, so DDP runs reduce correctly.
    """

    def __init__(
        self,
        categories: Sequence[str],
        part_names_by_category: Mapping[str, Sequence[str]],
        uids: Sequence[str] | None = None,
        keep_per_shape: bool = True,
        benchmark: str | None = None,
    ) -> None:
        super().__init__()
        if benchmark is not None:
            get_reference(benchmark)  # an unknown key fails here, not after the whole run
        self.benchmark = benchmark
        self.categories = list(categories)
        self.part_names_by_category = {c: list(v) for c, v in part_names_by_category.items()}
        self.uids = list(uids) if uids is not None else None
        self.metric = PartSegIoU(
            self.categories,
            {
                c: len(self.part_names_by_category[c])
                for c in self.categories
                if c in self.part_names_by_category
            },
            keep_per_shape=keep_per_shape,
        )
        self.restart_timer()

    def restart_timer(self) -> None:
        """Start the end-to-end clock (construction starts it; Lightning builds the evaluator at the
        test epoch's start, before the first batch is read)."""
        self._t0 = time.perf_counter()

    @classmethod
    def from_dataset(
        cls,
        dataset: PartSegDataset | ResampledDataset,
        keep_per_shape: bool = True,
        benchmark: str | None = None,
    ) -> PartSegEvaluator:
        """``benchmark`` defaults to the dataset's ``benchmark`` attribute (set by EvalDataModule)."""
        base = dataset.dataset if isinstance(dataset, ResampledDataset) else dataset
        uids = [base.uid_of(i) for i in range(len(base))]
        if benchmark is None:
            benchmark = getattr(dataset, "benchmark", None)
        return cls(base.categories, base.part_names_by_category, uids, keep_per_shape, benchmark)

    def reset(self) -> None:
        self.metric.reset()

    def update(
        self,
        pred_labels: Tensor,
        gt_labels: Tensor,
        category: Sequence[str] | Tensor,
        num_parts: Sequence[int] | Tensor | None = None,
        shape_ids: Tensor | None = None,
    ) -> None:
        """Add a batch of ``(B, N)`` predicted and ground-truth local part ids."""
        self.metric.update(pred_labels, gt_labels.to(pred_labels.device), category, num_parts, shape_ids)

    def update_batch(self, pred_labels: Tensor, batch: dict[str, Any]) -> None:
        """:meth:`update` from a collated benchmark batch (``labels``, ``category``, ``part_names``,
        ``index``), the one place that reads those fields; they are moved to ``pred_labels``' device."""
        self.update(
            pred_labels,
            batch["labels"],
            batch["category"],
            num_parts=[len(p) for p in batch["part_names"]],
            shape_ids=batch["index"].to(pred_labels.device),
        )

    def compute(self) -> EvalReport:
        res = self.metric.compute()
        scalars = self.metric.scalars(res)
        # torchmetrics squeezes one-element outputs to 0-d (a single category): restore (C,)
        per_cat = {
            k: v.reshape(-1)
            for k, v in res.items()
            if k.endswith(("per_category", "per_category_accuracy", "num_shapes"))
        }
        rows = []
        for i, cat in enumerate(self.categories):
            row: dict[str, Any] = {"category": cat, "num_shapes": int(per_cat["num_shapes"][i])}
            for conv in CONVENTIONS:
                row[conv] = float(per_cat[f"{conv}/per_category"][i])
            row["accuracy"] = float(per_cat["per_category_accuracy"][i])
            rows.append(row)
        per_shape = []
        if self.metric.keep_per_shape:
            miou, cat_idx, ids = self.metric.per_shape()
            for m, c, s in zip(miou.tolist(), cat_idx.tolist(), ids.tolist(), strict=True):
                rec = {
                    "shape_id": s,
                    "category": self.categories[c],
                    **dict(zip(CONVENTIONS, m, strict=True)),
                }
                if self.uids is not None and 0 <= s < len(self.uids):
                    rec["uid"] = self.uids[s]
                per_shape.append(rec)
        if self.metric.iou_sum.device.type == "cuda":
            torch.cuda.synchronize(self.metric.iou_sum.device)
        seconds = time.perf_counter() - self._t0
        num_shapes = sum(r["num_shapes"] for r in rows)
        report = EvalReport(
            scalars=scalars,
            rows=rows,
            per_shape=per_shape,
            info={
                "num_shapes": num_shapes,
                "seconds": seconds,
                "seconds_per_shape": seconds / max(num_shapes, 1),
            },
        )
        report.set_reference(self.benchmark)
        return report


def _resolve_encoder(model: Any) -> tuple[nn.Module, float]:
    """Accept a ``PatchAlignEncoder``, a ``PretrainedPatchAlign`` or an exported directory."""
    if isinstance(model, str | Path):
        from patchalign.pretrained import load_pretrained

        model = load_pretrained(model)
    scale = DEFAULT_LOGIT_SCALE
    if hasattr(model, "encoder") and hasattr(model, "logit_scale_value"):
        scale = float(model.logit_scale_value)
        model = model.encoder
    return model, scale


def run_zero_shot_eval(
    model: Any,
    dataset: PartSegDataset | ResampledDataset,
    text_encoder_or_bank: TextSource,
    batch_size: int = 32,
    num_points: int = 2048,
    seed: int = 0,
    templates: str | Sequence[str] = "part_only",
    assign: AssignMode = "nearest",
    knn: int = 3,
    none_threshold: float | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    amp: bool = False,
    out_dir: str | Path | None = None,
    viz_per_category: int = 0,
    viz_convention: str = "released",
    verbose: bool = True,
    benchmark: str | None = None,
) -> EvalReport:
    """Zero-shot part segmentation of ``dataset``: files -> encoder -> text scores -> metrics.

    Args:
        model: ``PatchAlignEncoder`` (any module returning ``EncoderOutput``), ``PretrainedPatchAlign``
            or the directory written by :func:`patchalign.tools.export.export_checkpoint`.
        dataset: a reader (wrapped in :class:`ResampledDataset` with ``num_points``/``seed``) or an
            already wrapped one.
        text_encoder_or_bank: see :class:`PartTextEmbedder`.
        templates, assign, knn, none_threshold: the protocol (see :func:`zero_shot_predict`).
        amp: bf16 autocast for the encoder on CUDA.
        out_dir: write ``results.csv`` / ``results.json`` (and pictures) here.
        viz_per_category: render the best and worst ``viz_per_category`` shapes of each category.
        verbose: print the per-category table.
        benchmark: the talk row to compare with (:data:`~patchalign.eval.references.TALK_REFERENCES`
            key); default the dataset's ``benchmark`` attribute, if any.

    Returns:
        The :class:`EvalReport`; ``info`` holds timing (``seconds_per_shape`` end to end from this
        call's start, ``shapes_per_s`` of the inference loop), missing-shape counts and the talk row.
    """
    t_entry = time.perf_counter()
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    encoder, logit_scale = _resolve_encoder(model)
    encoder = encoder.to(device).eval()
    ds = dataset if isinstance(dataset, ResampledDataset) else ResampledDataset(dataset, num_points, seed)
    base = ds.dataset
    if len(ds) == 0:
        raise ValueError(f"{base.name}: no shapes to evaluate ({base.num_missing} listed shapes are missing)")
    embedder = PartTextEmbedder(text_encoder_or_bank, templates, device=device)
    # Encode every category's vocabulary up front: one batched text-encoder call, not one per batch.
    present = {base.category_of(i) for i in range(len(base))}
    for cat, names in base.part_names_by_category.items():
        if cat in present:
            embedder.embed(names, cat if embedder.uses_category else None)
    evaluator = PartSegEvaluator.from_dataset(ds, benchmark=benchmark).to(device)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_part_samples,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    start = time.perf_counter()
    n_shapes = 0
    with torch.inference_mode():
        for batch in loader:
            points = batch["points"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                pred = zero_shot_predict(
                    encoder,
                    {**batch, "points": points},
                    embedder,
                    assign=assign,
                    k=knn,
                    logit_scale=logit_scale,
                    none_threshold=none_threshold,
                )
            evaluator.update_batch(pred.labels, batch)
            n_shapes += points.shape[0]
        report = evaluator.compute()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    end_to_end = time.perf_counter() - t_entry
    report.info.update(
        {
            "dataset": base.name,
            "num_shapes": n_shapes,
            "num_missing": base.num_missing,
            "num_points": ds.num_points,
            "seed": ds.seed,
            "templates": embedder.template_list,
            "assign": assign,
            "text_encoder": embedder.id,
            "seconds": elapsed,
            "shapes_per_s": n_shapes / max(elapsed, 1e-9),
            "seconds_end_to_end": end_to_end,
            "seconds_per_shape": end_to_end / max(n_shapes, 1),
            "device": str(device),
        }
    )
    if verbose:
        print(f"{base.name}: {n_shapes} shapes ({base.num_missing} listed but missing), {elapsed:.1f} s")
        print(report.format_table())
    if out_dir is not None:
        report.save(out_dir)
        if viz_per_category > 0:
            render_best_worst(
                report,
                ds,
                encoder,
                embedder,
                Path(out_dir) / "viz",
                viz_per_category,
                viz_convention,
                assign=assign,
                k=knn,
                logit_scale=logit_scale,
                device=device,
            )
    return report


def render_best_worst(
    report: EvalReport,
    ds: ResampledDataset,
    encoder: nn.Module,
    embedder: PartTextEmbedder,
    out_dir: Path,
    per_category: int = 1,
    convention: str = "released",
    **predict_kw: Any,
) -> list[Path]:
    """Re-run the best/worst ``per_category`` shapes of each category and save prediction,
    ground-truth and PCA pictures."""
    from patchalign.eval.pictures import save_shape_figures

    device = predict_kw.pop("device")
    written: list[Path] = []
    for cat, (best, worst) in report.best_worst(convention, per_category).items():
        for tag, recs in (("best", best), ("worst", worst)):
            for rank, rec in enumerate(recs):
                sample = ds[rec["shape_id"]]
                batch = collate_part_samples([sample])
                points = batch["points"].to(device)
                with torch.inference_mode():
                    pred = zero_shot_predict(encoder, {**batch, "points": points}, embedder, **predict_kw)
                out = pred.encoding
                stem = f"{cat}_{tag}{rank}_{rec.get('uid', rec['shape_id'])}".replace("/", "_").replace(
                    " ", "_"
                )
                title = f"{cat} {tag}: {convention} mIoU {100 * rec[convention]:.1f}"
                written += save_shape_figures(
                    out_dir / stem,
                    points[0].cpu(),
                    pred.labels[0].cpu(),
                    sample["part_names"],
                    gt_labels=batch["labels"][0],
                    patch_features=out.patch_features[0].float().cpu(),
                    point_to_patch=out.point_to_patch[0].cpu(),
                    title=title,
                )
    return written
