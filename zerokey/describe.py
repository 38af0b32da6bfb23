"""Describe-then-retrieve: the authors' describability study, runnable (Gong et al., arXiv:2412.06292;
``describe_points.py`` of Wenri/Zero-Shot-3DKP @1b2338d321f6610dec3bddad4df63831b2457855, read, not copied).

A point of the shape is marked with a red dot in one view and an MLLM is asked to name it ("Precisely name
the part of the {category} marked by the red dot. Answer with just a name."); ZeroKey then retrieves that
name (:class:`DescribeNamer` is a namer, so any pointer / clustering preset runs after it) and
:func:`describability` scores how close the retrieved keypoints come back to the marked point, separately
for salient points (annotated keypoints) and non-salient ones (random surface vertices).

Differences from theirs: they render a red icosphere (radius 0.05) into the mesh at distance 2.0; we paint
a red disc over the projection of the point in the first view where it is visible (our renders, any
preset). Their pointing prompt there is "point to the {kp} on this {cat}"; ours is the pointer's.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from zerokey.data import ShapeSample
from zerokey.mllm.client import BudgetExceeded, CallBudget, ChatClient, ChatError
from zerokey.mllm.namers import Namer, NamingResult
from zerokey.mllm.parsing import ParseStats
from zerokey.views import RenderedViews, project_visible

__all__ = ["DESCRIBE_PROMPT", "DescribeNamer", "mark_point", "describability", "clean_name"]

#: ``describe_points.py`` @1b2338d.
DESCRIBE_PROMPT = "Precisely name the part of the {category} marked by the red dot. Answer with just a name."


def mark_point(image: Tensor, uv: tuple[float, float], radius_px: float) -> Tensor:
    """A copy of (H,W,3) ``image`` with a red disc of ``radius_px`` centred on ``uv`` (pixel centres +0.5)."""
    h, w = image.shape[:2]
    rows = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    cols = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    inside = (cols - uv[0]) ** 2 + (rows - uv[1]) ** 2 <= radius_px**2
    out = image.clone()
    out[inside.to(image.device)] = torch.tensor([1.0, 0.0, 0.0], dtype=image.dtype, device=image.device)
    return out


def clean_name(answer: str | None) -> str | None:
    """The name in a "just a name" answer: first non-empty line, quotes / trailing punctuation stripped."""
    for line in (answer or "").splitlines():
        name = line.strip().strip("\"'`*").rstrip(".").strip()
        if name:
            return name
    return None


class DescribeNamer(Namer):
    """Mark one point per shape, ask an OpenAI-compatible MLLM for its name, and look for that name.

    Args:
        marked: "keypoint" (salient: one of the shape's annotated keypoints, chosen by the seed) or
            "random" (non-salient: a random vertex / cloud point).
        radius_px: the red dot's radius in render pixels.
        seed: choice of the point (per shape id, so reruns and ranks agree).

    The marked point (input frame) and the view it was shown in go into the shape's record as
    ``naming_details`` (read by :func:`describability`); a shape whose point is visible in no view, or
    whose answer is empty, fails with that reason.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        prompt: str = DESCRIBE_PROMPT,
        marked: Literal["keypoint", "random"] = "keypoint",
        radius_px: float = 6.0,
        seed: int = 0,
        timeout: float = 60.0,
        max_retries: int = 2,
        max_tokens: int = 32,
    ) -> None:
        if marked not in ("keypoint", "random"):
            raise ValueError(f"marked must be 'keypoint' or 'random', got {marked!r}")
        if radius_px <= 0:
            raise ValueError(f"radius_px must be > 0, got {radius_px}")
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries, max_tokens=max_tokens)
        self.prompt, self.marked, self.radius_px, self.seed = prompt, marked, radius_px, seed

    def check(self) -> None:
        self.client.ping()

    def attach_budget(self, budget: CallBudget) -> None:
        self.client.budget = budget

    def settings(self) -> dict[str, Any]:
        return {
            "class": "zerokey.describe.DescribeNamer",
            "client": self.client.settings(),
            "prompt": self.prompt,
            "marked": self.marked,
            "radius_px": self.radius_px,
            "seed": self.seed,
        }

    def _choose(self, shape: ShapeSample) -> Tensor:
        gen = np.random.default_rng(zlib.crc32(f"{self.seed}:{self.marked}:{shape.shape_id}".encode()))
        if self.marked == "keypoint":
            if shape.keypoints is None or len(shape.keypoints) == 0:
                raise ValueError(f"marked 'keypoint' needs annotated keypoints; {shape.shape_id} has none")
            return shape.keypoints[int(gen.integers(len(shape.keypoints)))]
        return shape.vertices[int(gen.integers(len(shape.vertices)))]

    def name_views(self, shape: ShapeSample, views: RenderedViews) -> NamingResult:
        """Mark, ask, and return the one name (with ``details``): needs the cameras, not just images."""
        point = self._choose(shape).to(views.depth.device)
        uv, visible = project_visible(point[None], views)
        shown = torch.nonzero(visible[:, 0]).flatten()
        if shown.numel() == 0:
            return NamingResult([], [], error=f"the marked point of {shape.shape_id} is visible in no view")
        v = int(shown[0])
        image = mark_point(views.images[v].detach().cpu(), tuple(uv[v, 0].tolist()), self.radius_px)
        details = {
            "marked": self.marked,
            "marked_xyz": [round(float(x), 6) for x in shape.to_original(point[None])[0]],
            "view": v,
        }
        prompt = self.prompt.format(category=shape.category or "object")
        try:
            answer = self.client.complete(prompt, [image])
        except (ChatError, BudgetExceeded) as err:
            return NamingResult([], [], ParseStats(failed_calls=1), calls=1, error=str(err), details=details)
        name = clean_name(answer)
        stats = ParseStats(answers=1, empty=0 if name else 1)
        details["answer"] = answer
        if not name:
            return NamingResult([], [], stats, calls=1, error="empty name", details=details)
        return NamingResult([name], [1], stats, calls=1, details=details)

    def __call__(self, shape: ShapeSample, images: Tensor) -> NamingResult:
        raise TypeError("DescribeNamer marks a point through the cameras: call name_views(shape, views)")


def describability(
    records: Sequence[dict], thresholds: Sequence[float] = (0.05, 0.1)
) -> dict[str, dict[str, Any]]:
    """Per ``marked`` group ("keypoint" = salient, "random" = not): shapes, the fraction retrieved within
    each Euclidean distance (input units) of the marked point by some keypoint of the record, and the
    median nearest distance. Failed shapes count as not retrieved (listed in ``failed``)."""
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        details = record.get("naming_details") or {}
        group = details.get("marked")
        if group is None:
            continue
        g = groups.setdefault(group, {"shapes": 0, "failed": [], "distances": []})
        g["shapes"] += 1
        xyz = np.array([k["xyz"] for k in record.get("keypoints") or []], dtype=float).reshape(-1, 3)
        if record.get("status") != "complete" or not len(xyz):
            g["failed"].append(record["shape_id"])
            g["distances"].append(float("inf"))
            continue
        g["distances"].append(float(np.linalg.norm(xyz - np.asarray(details["marked_xyz"]), axis=1).min()))
    out = {}
    for name, g in groups.items():
        d = np.asarray(g["distances"])
        out[name] = {
            "shapes": g["shapes"],
            "retrieved": {f"{t:.2f}": float(np.mean(d <= t)) for t in thresholds},
            "median_distance": float(np.median(d)),
            "failed": g["failed"],
        }
    return out


def describe_eval(pred: str, thresholds: list[float] | None = None, out: str | None = None) -> dict:
    """Describability of a run of :class:`DescribeNamer` (``python -m zerokey describe``).

    Args:
        pred: the run folder (per-shape JSONs with ``naming_details``).
        thresholds: Euclidean distances (input units) within which a marked point counts as retrieved.
        out: also write the result as JSON here (an existing file is refused).
    """
    from zerokey.writer import iter_prediction_files

    records = [r for _, r in iter_prediction_files(pred)]
    result = describability(records, thresholds or [0.05, 0.1])
    if not result:
        raise SystemExit(f"zerokey describe: no DescribeNamer records (naming_details) under {pred}")
    for group, row in sorted(result.items()):
        label = "salient (keypoint)" if group == "keypoint" else "non-salient (random)"
        within = ", ".join(f"within {t}: {v:.3f}" for t, v in row["retrieved"].items())
        median, failed = row["median_distance"], len(row["failed"])
        print(f"{label}: {row['shapes']} shapes, {within}, median {median:.4f}, failed {failed}")
    if out:
        if Path(out).exists():
            raise SystemExit(f"zerokey describe: {out} exists; not overwritten")
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m zerokey describe ...`` (flags: :func:`describe_eval`'s parameters)."""
    from zerokey.cli import run_function_cli

    return run_function_cli(describe_eval, argv, "python -m zerokey describe")
