"""``python -m patchalign report RUN_DIR... [--out DIR]``: the talk's tables, ours beside them.

Gathers the result files evaluation runs already write and puts them in one Markdown report:

* part segmentation: every ``results.json`` under a run directory (what ``patchalign test`` with a
  ``configs/eval/*.yaml`` config and ``python -m patchalign.eval --out`` write). Its ``info.benchmark``
  names the talk row; ours is read under that row's metric convention.
* keypoints: every JSON that ``python -m zerokey evaluate --out`` writes (``thresholds``,
  ``mean_iou``, ``iou``). That file records no method, so it is reported as the ZeroKey row unless
  it carries a ``"method"`` field naming another row (``patchalign3d_zeroshot`` / ``_fewshot``);
  and the rows ``python -m zerokey.features.bench --json_out`` writes (``patchalign zero-shot`` and
  ``patchalign few-shot K=k`` are the PatchAlign3D keypoint rows; its oracle-pointer rows are
  skipped with a printed count, the talk's ZeroKey row uses Molmo).

The report has one table with every row of the talk (rows without a result say "not run" and give
the command), then per benchmark a per-category bar chart (ours per category; ours and the talk's
instance / category mIoU side by side: the talk prints no per-category numbers) and the best /
worst pictures found in the run's ``viz/`` folder. It writes ``report.md``, ``report.csv`` and the
PNGs into ``--out`` and refuses to overwrite an earlier report unless ``--overwrite`` is given.

A run directory with no result file, or an unreadable result file, is an error (exit status 2):
a report that silently leaves a benchmark out would read as if it had not been run.

Ablations: a ShapeNetPart result evaluated from one of ``configs/ablations/`` rows' runs (its path,
or the checkpoint its saved ``config.yaml`` evaluated, lies in ``outputs/ablations/<table>/<row>``;
:func:`patchalign.eval.references.ablation_row_for`) fills that row of the paper's four ablation
tables (training strategy, text encoder, 2D teacher, Stage 2 freezing), printed beside the paper's
numbers with the command of every row not yet run. ``python -m patchalign report outputs/ablations``
gathers them all.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from patchalign.eval.references import (
    ABLATION_ROWS,
    ABLATION_TABLES,
    TALK_REFERENCES,
    Reference,
    ablation_row_for,
    get_reference,
)

KEYPOINT_METHODS = {str(r.extra["method"]): r.key for r in TALK_REFERENCES.values() if "method" in r.extra}


@dataclass
class PartSegResult:
    """One ``results.json``: the talk row, ours (0..1 scalars), per-category rows, timing."""

    path: Path
    benchmark: str | None
    scalars: dict[str, float]
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    pictures: list[Path] = field(default_factory=list)
    evaluated: str | None = None  # the checkpoint the evaluation read (from its saved config.yaml)

    @property
    def reference(self) -> Reference | None:
        return get_reference(self.benchmark) if self.benchmark else None

    @property
    def num_shapes(self) -> int | None:
        return self.info.get("num_shapes")

    @property
    def seconds_per_shape(self) -> float | None:
        return self.info.get("seconds_per_shape")


@dataclass
class KeypointResult:
    """One ``zerokey evaluate --out`` JSON: mean IoU (0..1) per threshold, per-class IoU."""

    path: Path
    benchmark: str
    thresholds: list[float]
    mean_iou: list[float]
    iou: dict[str, list[float]]
    shapes: dict[str, int]
    label: str = ""
    seconds_per_shape: float | None = None

    @property
    def num_shapes(self) -> int | None:
        return sum(self.shapes.values()) if self.shapes else None

    def at(self, threshold: float) -> float | None:
        for t, v in zip(self.thresholds, self.mean_iou, strict=True):
            if abs(t - threshold) < 1e-6:
                return float(v)
        return None


Result = PartSegResult | KeypointResult


def _feature_bench_rows(path: Path, rows: list[dict[str, Any]]) -> list[Result]:
    """``python -m zerokey.features.bench --json_out`` rows (IoU 0..1 keyed by threshold string): the
    PatchAlign3D-feature rows become keypoint results; the oracle-pointer rows are not the talk's
    protocol (no Molmo) and are skipped with a printed count."""
    out: list[Result] = []
    skipped = []
    for row in rows:
        name = str(row["row"])
        key = (
            "keypointnet_patchalign3d_zeroshot"
            if name.startswith("patchalign zero-shot")
            else "keypointnet_patchalign3d_fewshot"
            if name.startswith("patchalign few-shot")
            else None
        )
        if key is None:
            skipped.append(name)
            continue
        thresholds = sorted(row["iou"], key=float)
        values = [float(row["iou"][t]) for t in thresholds]
        out.append(
            KeypointResult(
                path, key, [float(t) for t in thresholds], values, {}, {}, name, row.get("seconds_per_shape")
            )
        )
    if skipped:
        print(
            f"report: {path}: skipped {len(skipped)} oracle-pointer rows (not the talk's protocol): {skipped}"
        )
    return out


def _load(path: Path) -> list[Result]:
    """Parse ``path`` if it is a result file (``[]``: some other JSON, e.g. a prediction)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable result file ({err})") from err
    if (
        isinstance(data, list)
        and data
        and all(isinstance(r, dict) and {"row", "iou"} <= set(r) for r in data)
    ):
        return _feature_bench_rows(path, data)
    if not isinstance(data, dict):
        return []
    if {"scalars", "rows", "info"} <= set(data):
        info = dict(data["info"] or {})
        bench = info.get("benchmark")
        if bench is not None:
            get_reference(bench)
        pictures = sorted((path.parent / "viz").glob("*_parts.png")) if (path.parent / "viz").is_dir() else []
        evaluated = _evaluated_checkpoint(path)
        return [
            PartSegResult(path, bench, dict(data["scalars"]), list(data["rows"]), info, pictures, evaluated)
        ]
    if {"thresholds", "mean_iou", "iou"} <= set(data):
        method = data.get("method", "zerokey")
        if method not in KEYPOINT_METHODS:
            raise ValueError(f"{path}: unknown keypoint method {method!r}; known: {sorted(KEYPOINT_METHODS)}")
        return [
            KeypointResult(
                path,
                KEYPOINT_METHODS[method],
                [float(t) for t in data["thresholds"]],
                [float(v) for v in data["mean_iou"]],
                {k: [float(x) for x in v] for k, v in data["iou"].items()},
                {k: int(v) for k, v in (data.get("shapes") or {}).items()},
            )
        ]
    return []


def _evaluated_checkpoint(results_json: Path) -> str | None:
    """The checkpoint a ``patchalign test`` run evaluated: ``ckpt_path`` or ``model.init_args.init_from``
    of the ``config.yaml`` it saved in its ``default_root_dir`` (``<root>/eval/results.json``).
    ``None`` when there is no such file (e.g. ``python -m patchalign.eval --out``)."""
    config = results_json.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())  # YAML errors span lines; one line here
        raise ValueError(f"{config}: unreadable saved config of the evaluation ({reason})") from err
    model = (cfg.get("model") or {}).get("init_args") or {}
    found = cfg.get("ckpt_path") or model.get("init_from")
    return None if found is None else str(found)


def ablation_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per (ablation row, metric, result): ours beside the paper's, ``ours=None`` if not run.

    Only ShapeNetPart results count (the paper's ablations are ShapeNetPart); empty when no result
    belongs to any ablation row, so a plain benchmark report has no ablation section.
    """
    found: dict[tuple[str, str], list[PartSegResult]] = {}
    for r in results:
        if isinstance(r, PartSegResult) and r.benchmark == "shapenetpart":
            for row in ablation_row_for([r.path, r.evaluated]):
                found.setdefault((row.table, row.key), []).append(r)
    if not found:
        return []
    out: list[dict[str, Any]] = []
    for row in ABLATION_ROWS:
        for run in found.get((row.table, row.key)) or [None]:
            for metric, paper in row.metrics.items():
                v = None if run is None else run.scalars.get(f"released/{metric}")
                ours = None if v is None or v != v else 100.0 * float(v)
                out.append(
                    {
                        "table": row.table,
                        "row": row.key,
                        "label": row.label,
                        "metric": metric,
                        "ours": ours,
                        "paper": float(paper),
                        "delta": None if ours is None else ours - float(paper),
                        "in_talk": row.in_talk,
                        "num_shapes": None if run is None else run.num_shapes,
                        "result": "" if run is None else str(run.path),
                        "command": row.command,
                    }
                )
    return out


def ablation_lines(rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """The Markdown section of the four ablation tables (empty without ablation results)."""
    if not rows:
        return []
    lines = [
        "",
        "## Ablations (ShapeNetPart, released convention)",
        "",
        "The paper's four ablation tables (main paper and appendix; the talk prints the same mIoU to one "
        "decimal and leaves out the rows marked *paper only*), each row one config in `configs/ablations/`.",
    ]
    for table, title in ABLATION_TABLES.items():
        lines += [
            "",
            f"### {title}",
            "",
            "| row | metric | ours | paper | Δ | shapes | result |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            if r["table"] != table:
                continue
            label = r["label"] + ("" if r["in_talk"] else " (*paper only*)")
            result = f"`{_rel(Path(r['result']), out)}`" if r["result"] else f"not run: `{r['command']}`"
            shapes = "-" if r["num_shapes"] is None else str(r["num_shapes"])
            lines.append(
                f"| {label} | {r['metric']} | {_pct(r['ours'])} | {_pct(r['paper'])} | {_pct(r['delta'])} "
                f"| {shapes} | {result} |"
            )
    return lines


def collect_results(run_dirs: Sequence[str | os.PathLike]) -> list[Result]:
    """Every result file under each run directory (or the file itself); a run directory without
    one is an error naming it."""
    results: list[Result] = []
    seen: set[Path] = set()
    for run in run_dirs:
        run = Path(run)
        if not run.exists():
            raise FileNotFoundError(f"run directory {run} does not exist")
        files = [run] if run.is_file() else sorted(run.rglob("*.json"))
        dupes = [f for f in files if f.resolve() in seen]  # a run named twice (or via a link)
        files = [f for f in files if f.resolve() not in seen]
        seen.update(f.resolve() for f in files)
        found = [r for f in files for r in _load(f)]
        if dupes and not found:
            print(f"report: {run}: its result files are already gathered from another run argument")
            continue
        if not found:
            raise FileNotFoundError(
                f"{run}: no result file (results.json of `patchalign test`, or `zerokey evaluate --out`)"
            )
        results += found
    return results


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _shapes_note(row: dict[str, Any]) -> str:
    full = TALK_REFERENCES[row["benchmark"]].num_shapes if row["benchmark"] in TALK_REFERENCES else None
    n = row["num_shapes"]
    return "" if n is None or full is None or n == full else "(partial)"


def summary_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per (talk row, metric, result); talk rows without a result get ``ours=None``."""
    rows: list[dict[str, Any]] = []
    by_key: dict[str, list[Result]] = {}
    for r in results:
        by_key.setdefault(r.benchmark or "", []).append(r)
    for key, ref in TALK_REFERENCES.items():
        runs = by_key.get(key) or [None]
        for run in runs:
            for metric, talk in ref.metrics.items():
                ours = None
                if isinstance(run, PartSegResult):
                    v = run.scalars.get(f"{ref.convention}/{metric}")
                    ours = None if v is None else 100.0 * float(v)
                elif isinstance(run, KeypointResult):
                    v = run.at(float(metric.split("@")[1]))
                    ours = None if v is None else 100.0 * v
                rows.append(
                    {
                        "benchmark": key,
                        "title": ref.title
                        + (f" [{run.label}]" if isinstance(run, KeypointResult) and run.label else ""),
                        "metric": metric,
                        "convention": ref.convention or "",
                        "ours": ours,
                        "talk": float(talk),
                        "delta": None if ours is None else ours - float(talk),
                        "num_shapes": None if run is None else run.num_shapes,
                        "seconds_per_shape": None if run is None else run.seconds_per_shape,
                        "result": str(run.path) if run is not None else "",
                        "command": ref.command,
                    }
                )
    for r in by_key.get("", []):  # part-segmentation runs the talk has no row for
        for metric in ("instance_mIoU", "category_mIoU"):
            v = r.scalars.get(f"released/{metric}")
            rows.append(
                {
                    "benchmark": f"(no talk row) {r.info.get('dataset', '?')}",
                    "title": "",
                    "metric": metric,
                    "convention": "released",
                    "ours": None if v is None else 100.0 * float(v),
                    "talk": None,
                    "delta": None,
                    "num_shapes": r.num_shapes,
                    "seconds_per_shape": r.seconds_per_shape,
                    "result": str(r.path),
                    "command": "",
                }
            )
    return rows


def plot_per_category(result: PartSegResult, path: Path) -> Path:
    """Bar chart: ours per category (the talk row's convention), then ours and the talk's instance
    and category mIoU side by side. Categories without shapes are left out."""
    import matplotlib.pyplot as plt

    fig = per_category_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def per_category_figure(result: PartSegResult) -> Any:
    """The figure :func:`plot_per_category` saves. Bars, in order: one per category with shapes,
    then (ours, talk) for category mIoU and for instance mIoU (ours only where the talk has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = result.reference
    conv = ref.convention if ref is not None and ref.convention else "released"
    cats = [r for r in result.rows if r.get("num_shapes") and r.get(conv) is not None]
    names = [f"{r['category']} ({r['num_shapes']})" for r in cats]
    values = [100.0 * float(r[conv]) for r in cats]
    summary = [("category mIoU", "category_mIoU"), ("instance mIoU", "instance_mIoU")]
    width = max(6.0, 0.45 * (len(cats) + 2 * len(summary)) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=110)
    x = list(range(len(cats)))
    ax.bar(x, values, color="#4C72B0", label=f"ours ({conv} convention)")
    if len(cats) <= 24:
        for xi, v in zip(x, values, strict=True):
            ax.text(xi, v + 1, f"{v:.1f}", ha="center", fontsize=7)
    if cats:
        ax.axvline(len(cats) - 0.25, color="0.6", lw=0.8)
    ticks, labels = list(x), list(names)
    pos = len(cats) + 0.5
    talk_label = "talk"
    for label, metric in summary:
        ours = result.scalars.get(f"{conv}/{metric}")
        talk = ref.metrics.get(metric) if ref is not None else None
        ax.bar(pos - 0.2, 100.0 * ours if ours is not None else 0.0, width=0.4, color="#4C72B0")
        if talk is not None:
            ax.bar(
                pos + 0.2,
                talk,
                width=0.4,
                color="#DD8452",
                label=talk_label,
            )
            talk_label = None
            ax.text(pos + 0.2, talk + 1, f"{talk:.1f}", ha="center", fontsize=7)
        if ours is not None:
            ax.text(pos - 0.2, 100.0 * ours + 1, f"{100.0 * ours:.1f}", ha="center", fontsize=7)
        ticks.append(pos)
        labels.append(label)
        pos += 1.2
    line = next((m for m in ("category_mIoU", "instance_mIoU") if ref is not None and m in ref.metrics), None)
    if line is not None:
        ax.axhline(ref.metrics[line], color="#DD8452", ls="--", lw=1)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=60 if len(labels) > 8 else 30, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    title = ref.title if ref is not None else str(result.info.get("dataset", "benchmark"))
    fig.suptitle(f"{title}: ours vs the talk", fontsize=10)
    ax.set_title(
        "per category (number of shapes), then the summary\n"
        + (f"dashed: the talk's {line.replace('_', ' ')} " if line else "")
        + "(the talk prints no per-category numbers)",
        fontsize=7,
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def write_report(
    results: Sequence[Result], out_dir: str | os.PathLike, overwrite: bool = False, max_pictures: int = 8
) -> Path:
    """Write ``report.md``, ``report.csv`` and the charts into ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    md_path = out / "report.md"
    if md_path.exists() and not overwrite:
        raise FileExistsError(f"{md_path} exists: pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    fields = [
        "benchmark", "metric", "convention", "ours", "talk", "delta",
        "num_shapes", "seconds_per_shape", "result",
    ]  # fmt: skip
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    lines = [
        "# Reproducing the talk: ours beside the talk's numbers",
        "",
        "mIoU / IoU in %. `ours` is read under the convention the talk row is compared in "
        "(see `patchalign/eval/references.py`); all three conventions are in each `results.json`.",
        "",
        "| benchmark | metric | convention | ours | talk | Δ | shapes | s / shape | result |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        result = f"`{_rel(Path(r['result']), out)}`" if r["result"] else f"not run: `{r['command']}`"
        sps = r["seconds_per_shape"]
        shapes = "-" if r["num_shapes"] is None else str(r["num_shapes"])
        if _shapes_note(r):
            shapes += f" of {TALK_REFERENCES[r['benchmark']].num_shapes} (partial)"
        lines.append(
            f"| {r['title'] or r['benchmark']} | {r['metric']} | {r['convention']} | {_pct(r['ours'])} "
            f"| {_pct(r['talk'])} | {_pct(r['delta'])} | {shapes} "
            f"| {'-' if sps is None else f'{sps:.4f}'} | {result} |"
        )
    partial = [r for r in rows if r["num_shapes"] is not None and "(partial)" in _shapes_note(r)]
    if partial:
        lines += [
            "",
            "**Partial runs** (fewer shapes than the talk's split; not comparable to the talk's number): "
            + ", ".join(sorted({r["benchmark"] for r in partial}))
            + ".",
        ]
    unconfirmed = sorted(
        {
            r.benchmark
            for r in results
            if isinstance(r, PartSegResult) and r.reference and not r.reference.confirmed
        }
    )
    if unconfirmed:
        lines += [
            "",
            "Protocol not confirmed by released code for: "
            + ", ".join(unconfirmed)
            + " (see each config's header).",
        ]
    for i, r in enumerate(results):
        if not isinstance(r, PartSegResult):
            continue
        ref = r.reference
        title = ref.title if ref else f"{r.info.get('dataset', 'benchmark')} (no talk row)"
        png = plot_per_category(r, out / f"{r.benchmark or 'run'}_{i}_per_category.png")
        lines += [
            "",
            f"## {title}",
            "",
            f"Result: `{_rel(r.path, out)}`",
            "",
            f"![per-category mIoU]({png.name})",
        ]
        empty = [row["category"] for row in r.rows if not row.get("num_shapes")]
        if empty:
            lines += ["", f"{len(empty)} categories have no shape in this run: {', '.join(empty)}."]
        if r.pictures:
            shown = r.pictures[:max_pictures]
            lines += ["", "Best / worst shapes (prediction | ground truth):", ""]
            lines += [f"![{p.stem}]({_rel(p, out)})" for p in shown]
            if len(r.pictures) > len(shown):
                lines.append(
                    f"\n({len(r.pictures) - len(shown)} more in `{_rel(r.pictures[0].parent, out)}`)"
                )
        else:
            lines += ["", "No best / worst pictures in this run (no `viz/` beside its results.json)."]
    lines += ablation_lines(ablation_rows(results), out)
    keypoint_runs = [r for r in results if isinstance(r, KeypointResult)]
    if keypoint_runs:
        lines += ["", "## KeypointNet", ""]
        for r in keypoint_runs:
            lines += [
                f"`{_rel(r.path, out)}` ({get_reference(r.benchmark).title}): "
                + ", ".join(
                    f"IoU@{t:.2f} {100 * v:.2f}" for t, v in zip(r.thresholds, r.mean_iou, strict=True)
                ),
                "",
            ]
        if any(r.seconds_per_shape is None for r in keypoint_runs):
            lines.append("`zerokey evaluate` records no seconds per shape; see `python -m zerokey bench`.")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m patchalign report",
        description="Gather evaluation results into one Markdown report beside the talk's numbers.",
    )
    p.add_argument("--config", action=ActionConfigFile, help="the options below from a YAML file")
    p.add_argument("runs", nargs="+", type=str, help="run directories (searched for result JSONs) or files")
    p.add_argument("--out", default="outputs/report", help="where report.md, report.csv and charts go")
    p.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="replace an earlier report in --out"
    )
    p.add_argument("--max-pictures", type=int, default=8, help="best/worst pictures shown per benchmark")
    args = p.parse_args(argv)
    try:
        results = collect_results(args.runs)
        md = write_report(results, args.out, overwrite=args.overwrite, max_pictures=args.max_pictures)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    rows = summary_rows(results)
    for r in rows:
        if r["ours"] is not None:
            print(
                f"{r['benchmark']:<36}{r['metric']:<15}ours {_pct(r['ours']):>7}  talk {_pct(r['talk']):>7}"
                f"  delta {_pct(r['delta']):>7}"
            )
    missing = sorted({r["benchmark"] for r in rows if r["ours"] is None})
    if missing:
        print(f"not run ({len(missing)} talk rows): {', '.join(missing)}")
    ablations = ablation_rows(results)
    for r in ablations:
        if r["ours"] is not None:
            print(
                f"ablation {r['table']}/{r['row']:<24}{r['metric']:<15}ours {_pct(r['ours']):>7}  "
                f"paper {_pct(r['paper']):>7}  delta {_pct(r['delta']):>7}"
            )
    if ablations:
        run = {(r["table"], r["row"]) for r in ablations if r["ours"] is not None}
        print(
            f"ablations: {len(run)} of {len(ABLATION_ROWS)} rows run (report.md lists the others' commands)"
        )
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
