"""Pictures of part segmentations and patch features (matplotlib, Agg: no display needed).

The evaluation draws its best / worst shapes with these (``run_zero_shot_eval(viz_per_category=...)``),
so they live in the eval layer; the tools (``python -m patchalign.tools.viz``, the demo) use them too.

* :func:`plot_part_labels` / :func:`save_shape_figures`: a shape coloured by predicted part with a
  legend of part names (and the ground truth beside it when given), and the same shape coloured by a
  PCA of its patch features mapped to RGB (each point takes its patch's colour via
  ``point_to_patch``), which shows what the encoder separates before any text is involved.

Points are drawn in the y-up convention of the datasets: x to the right, y up, z towards the viewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import Tensor  # noqa: E402

UNLABELLED_COLOR = (0.75, 0.75, 0.75)


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def part_palette(num_parts: int) -> np.ndarray:
    """``(K, 3)`` distinct RGB colours (tab10, tab20 beyond 10 parts, then HSV)."""
    if num_parts <= 10:
        return np.asarray(plt.get_cmap("tab10").colors[:num_parts])
    if num_parts <= 20:
        return np.asarray(plt.get_cmap("tab20").colors[:num_parts])
    return plt.get_cmap("hsv")(np.linspace(0, 1, num_parts, endpoint=False))[:, :3]


def pca_rgb(features: Tensor | np.ndarray) -> np.ndarray:
    """Project ``(G, D)`` features on their first 3 principal axes and map each to ``[0, 1]``.

    Each axis is scaled between its 1st and 99th percentile so one outlier patch does not wash out
    the others. With fewer than 3 informative axes the missing channels are mid-grey.
    """
    f = torch.as_tensor(_np(features), dtype=torch.float64)
    if f.dim() != 2 or f.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (G, D) array, got {tuple(f.shape)}")
    f = f - f.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(f, full_matrices=False)
    proj = (f @ v[: min(3, v.shape[0])].T).numpy()
    rgb = np.full((f.shape[0], 3), 0.5)
    for c in range(proj.shape[1]):
        lo, hi = np.percentile(proj[:, c], [1, 99])
        if hi - lo > 1e-12:
            rgb[:, c] = np.clip((proj[:, c] - lo) / (hi - lo), 0, 1)
    return rgb


def _scatter(ax, points: np.ndarray, colors: np.ndarray, title: str | None, size: float) -> None:
    # y-up data: plot (x, z, y) so matplotlib's vertical axis is the shape's up axis.
    ax.scatter(points[:, 0], points[:, 2], points[:, 1], c=colors, s=size, linewidths=0, depthshade=False)
    lim = float(np.abs(points).max()) or 1.0
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-lim, lim)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=20, azim=-60)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def label_colors(labels: np.ndarray, num_parts: int) -> np.ndarray:
    pal = part_palette(max(num_parts, 1))
    colors = np.tile(np.asarray(UNLABELLED_COLOR), (labels.shape[0], 1))
    ok = (labels >= 0) & (labels < num_parts)
    colors[ok] = pal[labels[ok]]
    return colors


def _save(fig: plt.Figure, path: str | os.PathLike, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (parents created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_part_labels(
    path: str | os.PathLike,
    points: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    part_names: Sequence[str],
    gt_labels: Tensor | np.ndarray | None = None,
    title: str | None = None,
    point_size: float = 3.0,
    dpi: int = 120,
) -> Path:
    """Save a PNG of ``points (N, 3)`` coloured by ``labels (N,)`` with a part-name legend.

    With ``gt_labels`` the ground truth is drawn in a second panel with the same colours.
    """
    pts, lab = _np(points).astype(np.float32), _np(labels).astype(np.int64)
    if pts.ndim != 2 or pts.shape[1] != 3 or lab.shape != (pts.shape[0],):
        raise ValueError(f"need points (N, 3) and labels (N,), got {pts.shape} and {lab.shape}")
    k = len(part_names)
    panels = [("prediction", lab)] + (
        [("ground truth", _np(gt_labels).astype(np.int64))] if gt_labels is not None else []
    )
    fig = plt.figure(figsize=(4.2 * len(panels) + 1.6, 4.4))
    for i, (name, lb) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
        _scatter(ax, pts, label_colors(lb, k), name if len(panels) > 1 else None, point_size)
    pal = part_palette(max(k, 1))
    handles = [Patch(color=pal[j], label=n) for j, n in enumerate(part_names)]
    if (lab < 0).any() or (gt_labels is not None and (_np(gt_labels) < 0).any()):
        handles.append(Patch(color=UNLABELLED_COLOR, label="(none)"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.0, right=0.8, top=0.9, bottom=0.02, wspace=0.0)
    return _save(fig, path, dpi)


def plot_feature_pca(
    path: str | os.PathLike,
    points: Tensor | np.ndarray,
    patch_features: Tensor | np.ndarray,
    point_to_patch: Tensor | np.ndarray,
    title: str | None = None,
    point_size: float = 3.0,
    dpi: int = 120,
) -> Path:
    """Save a PNG of ``points`` coloured by the PCA-RGB of their patch's feature (``point_to_patch``)."""
    pts, p2p = _np(points).astype(np.float32), _np(point_to_patch).astype(np.int64)
    rgb = pca_rgb(patch_features)
    if p2p.shape != (pts.shape[0],) or p2p.min() < 0 or p2p.max() >= rgb.shape[0]:
        raise ValueError("point_to_patch must give one valid patch index per point")
    fig = plt.figure(figsize=(4.4, 4.4))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    _scatter(ax, pts, rgb[p2p], None, point_size)
    fig.suptitle(title or "patch features (PCA -> RGB)", fontsize=10)
    fig.subplots_adjust(left=0, right=1, top=0.92, bottom=0)
    return _save(fig, path, dpi)


def save_shape_figures(
    stem: str | os.PathLike,
    points: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    part_names: Sequence[str],
    gt_labels: Tensor | np.ndarray | None = None,
    patch_features: Tensor | np.ndarray | None = None,
    point_to_patch: Tensor | np.ndarray | None = None,
    title: str | None = None,
) -> list[Path]:
    """``<stem>_parts.png`` (prediction, + ground truth) and, with features, ``<stem>_pca.png``."""
    stem = Path(stem)
    out = [
        plot_part_labels(
            stem.with_name(stem.name + "_parts.png"), points, labels, part_names, gt_labels, title
        )
    ]
    if patch_features is not None and point_to_patch is not None:
        out.append(
            plot_feature_pca(
                stem.with_name(stem.name + "_pca.png"), points, patch_features, point_to_patch, title
            )
        )
    return out
