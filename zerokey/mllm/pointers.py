"""Pointers: where each named keypoint is in each rendered view (2D pixel coordinates).

Three implementations behind one interface:

* :class:`MolmoPointer` -- Molmo in process through ``transformers`` remote code, batched over views;
* :class:`OpenAIPointer` -- any OpenAI-compatible server (e.g. vLLM serving Molmo): by default one
  request per (view, name) with the paper's prompt "Point to the {name} in this image."
  (arXiv:2412.06292; the form Molmo was trained to answer), sent from a bounded pool;
* :class:`OraclePointer` -- an *evaluation tool*, not a detector: it projects the known ground-truth
  keypoints into the views (with a depth test for visibility) and perturbs them with seeded pixel
  noise, dropout and outliers, so the 3D half of the pipeline can be measured in isolation.

Every pointer returns a flat :class:`Points2D` (one row per 2D point), which is what the vectorised
lifting step consumes.
"""

from __future__ import annotations

import logging
import os
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from zerokey.data import ShapeSample
from zerokey.mllm.client import BudgetExceeded, CallBudget, ChatClient, ChatError, MLLMRole, plain_settings
from zerokey.mllm.parsing import (
    ParsedPoint,
    ParseStats,
    parse_labelled_points,
    parse_pointer_answer,
    parse_xy_json,
)
from zerokey.original import ORIGINAL_LABEL_OVERRIDES, downsample_for_pointer
from zerokey.views import RenderedViews, project_visible

__all__ = [
    "Points2D",
    "Pointer",
    "OraclePointer",
    "OpenAIPointer",
    "MolmoPointer",
    "MolmoWeightsError",
    "DEFAULT_POINT_PROMPT",
    "build_point_prompt",
    "build_multi_point_prompt",
    "points_to_pixels",
    "collate_molmo_inputs",
    "load_molmo",
]

log = logging.getLogger(__name__)

DEFAULT_POINT_PROMPT = "Point to the {name} in this image."
#: ``mode="all_names"`` only (our option, not the paper's): the names are numbered and each point's
#: ``alt`` must be the exact name or its number. The example deliberately names nothing requested, so
#: an echoed prompt cannot be read as a point.
DEFAULT_MULTI_POINT_PROMPT = (
    "Point to each of the following in this image: {names}. Give every point the exact name (or its "
    'number) it belongs to in its alt attribute, e.g. <point x="50.0" y="50.0" alt="NAME">NAME</point>; '
    "use one <points x1=.. y1=.. x2=.. y2=.. alt=..> tag for several instances of one name. "
    "Skip names that are not visible."
)


@dataclass
class Points2D:
    """2D keypoint detections of one shape, flat: row ``i`` is pixel ``uv[i]`` (column, row; pixel
    centres at +0.5) in view ``view[i]`` for name ``name_index[i]``."""

    uv: Tensor  # (P,2) float
    view: Tensor  # (P,) long
    name_index: Tensor  # (P,) long
    stats: ParseStats = field(default_factory=ParseStats)
    calls: int = 0
    #: why this shape's pointing is incomplete (some calls failed), None when every call answered.
    error: str | None = None

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Points2D:
        return Points2D(
            torch.zeros(0, 2, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )

    def __len__(self) -> int:
        return self.uv.shape[0]


def points_to_pixels(points: list[ParsedPoint], width: int, height: int) -> list[tuple[float, float]]:
    """Molmo percent coordinates -> continuous pixel coordinates (0..W, 0..H)."""
    return [(p.x / 100.0 * width, p.y / 100.0 * height) for p in points]


def _pack(
    rows: list[tuple[float, float, int, int]], device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    if not rows:
        e = Points2D.empty(device)
        return e.uv, e.view, e.name_index
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, :2].float().to(device), t[:, 2].long().to(device), t[:, 3].long().to(device)


class Pointer(MLLMRole, ABC):
    """Interface: ``pointer(shape, names, views) -> Points2D``.

    Besides ``__call__`` a pointer may override:

    * ``check()`` -- called once before the first shape; raise with one clear line when the pointer
      cannot work (server down, weights missing) so a run fails in seconds, not per shape;
    * ``attach_budget(budget)`` -- the run's :class:`~zerokey.mllm.client.CallBudget` for its calls;
    * ``settings()`` -- what determines its answers (hashed into each run's config hash);
    * ``is_oracle`` -- True for evaluation tools that read the ground truth (the run says so).
    """

    is_oracle: bool = False

    @abstractmethod
    def __call__(self, shape: ShapeSample, names: list[str], views: RenderedViews) -> Points2D: ...


def build_point_prompt(name: str, template: str = DEFAULT_POINT_PROMPT) -> str:
    """Molmo's pointing prompt for one name ("Point to the {name} in this image.")."""
    return template.format(name=" ".join(name.split()))


def build_multi_point_prompt(names: list[str], template: str = DEFAULT_MULTI_POINT_PROMPT) -> str:
    """One prompt asking for all names at once, numbered (``1. "nose"; 2. "tail"``); answers carry the
    exact name or its number in ``alt`` (:func:`zerokey.mllm.parsing.match_label`)."""
    if not names:
        raise ValueError("need at least one name")
    listed = "; ".join(f'{i + 1}. "{" ".join(n.split())}"' for i, n in enumerate(names))
    return template.format(names=listed)


# ---------------------------------------------------------------------------------------- Oracle
class OraclePointer(Pointer):
    """EVALUATION TOOL: ground-truth keypoints projected into the views, optionally corrupted.

    A keypoint of a requested name (exact string match with the shape's ``keypoint_names``) is
    answered in a view when it is in front of the camera, inside the image, and passes a depth test
    against the rendered depth at its pixel (``|depth_render - depth_kp| <= depth_tolerance``, i.e. it is
    not hidden behind other surface). Then, independently per answer:

    * with probability ``dropout`` it is not answered (the model missed it);
    * otherwise its pixel gets Gaussian noise with std ``noise_px``;
    * with probability ``outlier_rate`` it is replaced by a uniformly random *foreground* pixel of the
      view (a confident wrong answer on the object).

    Points pushed outside the image are dropped and counted ``out_of_range``. Randomness is seeded from
    ``seed`` and the shape id, so results do not depend on batch order or the number of GPUs.
    """

    is_oracle = True

    def __init__(
        self,
        noise_px: float = 0.0,
        dropout: float = 0.0,
        outlier_rate: float = 0.0,
        seed: int = 0,
        depth_tolerance: float = 0.03,
        labels: Literal["semantic_names", "original"] = "semantic_names",
    ) -> None:
        if labels not in ("semantic_names", "original"):
            raise ValueError(f"labels must be 'semantic_names' or 'original', got {labels!r}")
        self.labels = labels
        for name, p in (("dropout", dropout), ("outlier_rate", outlier_rate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if noise_px < 0:
            raise ValueError(f"noise_px must be >= 0, got {noise_px}")
        self.noise_px, self.dropout, self.outlier_rate = noise_px, dropout, outlier_rate
        self.seed, self.depth_tolerance = seed, depth_tolerance

    def _keypoint_names(self, shape: ShapeSample) -> list[str | None]:
        """The ground-truth keypoints' names: the shape's, or (``labels="original"``) the authors' label
        table's for their semantic ids (:data:`zerokey.original.ORIGINAL_LABEL_OVERRIDES`)."""
        names = list(shape.keypoint_names or [])
        if self.labels == "original":
            ids = shape.extra.get("semantic_ids")
            if ids is None or len(ids) != len(names):
                raise ValueError(f"labels 'original' needs the semantic ids of shape {shape.shape_id}")
            override = ORIGINAL_LABEL_OVERRIDES.get(shape.category or "", {})
            names = [override.get(int(i), n) for i, n in zip(ids, names, strict=True)]
        return names

    def __call__(self, shape: ShapeSample, names: list[str], views: RenderedViews) -> Points2D:
        device = views.depth.device
        if shape.keypoints is None or shape.keypoint_names is None:
            raise ValueError(f"OraclePointer needs ground-truth keypoints, shape {shape.shape_id} has none")
        kp_names = self._keypoint_names(shape)
        kp_name = [names.index(n) if n in names else -1 for n in kp_names]
        keep = torch.tensor([i >= 0 for i in kp_name], dtype=torch.bool)
        n_views, size = views.n_views, views.image_size
        stats = ParseStats(answers=n_views * len(names))
        if not bool(keep.any()):
            stats.declined = stats.answers
            return Points2D.empty(device)
        keypoints = shape.keypoints.to(device)[keep.to(device)]
        name_of_kp = torch.tensor(kp_name, dtype=torch.long)[keep].to(device)
        uv, visible = project_visible(keypoints, views, self.depth_tolerance)  # (V,K,2), (V,K)

        gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{self.seed}:{shape.shape_id}".encode()))
        shape_vk = visible.shape
        kept = visible & (torch.rand(shape_vk, generator=gen) >= self.dropout).to(device)
        noisy = uv + self.noise_px * torch.randn(*shape_vk, 2, generator=gen).to(device)
        outlier = (torch.rand(shape_vk, generator=gen) < self.outlier_rate).to(device)
        # Outliers: uniform over each view's foreground pixels (a random rank into that view's mask).
        fg_count = views.mask.flatten(1).sum(1)  # (V,)
        rank = (torch.rand(shape_vk, generator=gen).to(device) * fg_count[:, None]).long()
        rank = torch.minimum(rank, (fg_count[:, None] - 1).clamp_min(0))
        fg_cumsum = views.mask.flatten(1).long().cumsum(1)  # (V,H*W)
        flat = torch.searchsorted(fg_cumsum, rank + 1)  # first pixel whose cumulative count reaches rank+1
        flat = flat.clamp_max(size * size - 1)
        jitter = torch.rand(*shape_vk, 2, generator=gen).to(device)
        outlier_uv = torch.stack([flat % size, flat // size], dim=-1).float() + jitter
        noisy = torch.where((outlier & (fg_count[:, None] > 0))[..., None], outlier_uv, noisy)

        in_image = (noisy >= 0).all(-1) & (noisy < size).all(-1)
        stats.out_of_range = int((kept & ~in_image).sum())
        final = kept & in_image
        v_idx, k_idx = torch.nonzero(final, as_tuple=True)
        answered = torch.zeros(n_views, len(names), dtype=torch.bool, device=device)
        answered[v_idx, name_of_kp[k_idx]] = True
        stats.points = int(final.sum())
        stats.declined = int((~answered).sum())
        return Points2D(noisy[v_idx, k_idx].float(), v_idx, name_of_kp[k_idx], stats, calls=0)


# ---------------------------------------------------------------------------------------- OpenAI
class OpenAIPointer(Pointer):
    """Point with an OpenAI-compatible multimodal server (e.g. ``vllm serve allenai/Molmo-7B-D-0924``).

    ``mode="per_name"`` (default, the paper's protocol): one request per (view, name) with ``prompt``
    ("Point to the {name} in this image.", the exact form Molmo answers best), V x N requests per
    shape, answers parsed with :func:`parse_molmo_points` (a ``<points>`` tag may carry several
    coordinates: several instances). ``mode="all_names"`` (our option, V requests per shape) asks for
    every name at once and keeps only points whose label is *exactly* one requested name or its number
    (:func:`~zerokey.mllm.parsing.match_label`); unmatched, ambiguous, duplicate labels and echoed prompts
    are counted, never guessed. ``fallback_per_name`` re-asks name by name in a view whose all-names
    answer gave no labelled point.

    The authors' code (``configs/zerokey/original.yaml``) is ``prompt: "point to the {name} on this
    image"``, ``parse: xml`` (the whole answer one XML element, else the view is dropped),
    ``max_points: 8`` (an answer with 8 or more points drops the view), ``send_size: 512`` (the 1024 px
    render goes out bicubic-downsampled, :func:`zerokey.original.downsample_for_pointer`; points map back
    to the render's pixels) and ``max_tokens: 2000``. Dropped views are counted in ``parse_stats``
    (``xml_error``, ``too_many_points``, ``malformed``) and in the run's summary.

    ``parse: json_xy`` is the authors' image-level MLLM ablation (GPT-4o asked for pixel xy as JSON,
    ``gpt4o_localize.py`` @116cbed; :func:`~zerokey.mllm.parsing.parse_xy_json`):
    ``configs/zerokey/original_gpt4o_localize.yaml`` (``temperature: 1``, JSON mode through
    ``extra_body``).

    Requests run from a bounded pool of ``max_workers`` threads (vLLM batches concurrent requests).
    A failed call (after the SDK's ``max_retries``) is counted in ``failed_calls`` and makes the shape
    incomplete (``Points2D.error``); the run's :class:`CallBudget` stops the run when they pile up.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        mode: Literal["per_name", "all_names"] = "per_name",
        prompt: str = DEFAULT_POINT_PROMPT,
        multi_prompt: str = DEFAULT_MULTI_POINT_PROMPT,
        fallback_per_name: bool = False,
        max_workers: int = 8,
        timeout: float = 60.0,
        max_retries: int = 2,
        max_tokens: int = 512,
        parse: Literal["tags", "xml", "json_xy"] = "tags",
        max_points: int | None = None,
        send_size: int | None = None,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        _check_answer_rules(parse, max_points, send_size)
        if mode == "all_names" and parse != "tags":
            raise ValueError(f"parse {parse!r} (one name per answer) needs mode 'per_name'")
        self.parse, self.max_points, self.send_size = parse, max_points, send_size
        if mode not in ("all_names", "per_name"):
            raise ValueError(f"mode must be 'per_name' or 'all_names', got {mode!r}")
        if "{name}" not in prompt:
            raise ValueError(f"prompt must contain '{{name}}', got {prompt!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.client = ChatClient(
            base_url,
            model,
            api_key_env,
            timeout,
            max_retries,
            max_tokens=max_tokens,
            temperature=temperature,
            extra_body=extra_body,
        )
        self.mode, self.prompt, self.multi_prompt = mode, prompt, multi_prompt
        self.fallback_per_name, self.max_workers = fallback_per_name, max_workers

    def check(self) -> None:
        self.client.ping()

    def attach_budget(self, budget: CallBudget) -> None:
        self.client.budget = budget

    def settings(self) -> dict[str, Any]:
        # The pool size changes speed, not answers: a resume may use another one.
        return {k: v for k, v in plain_settings(self).items() if k != "max_workers"}

    def _ask(self, prompt: str, image: Tensor) -> tuple[str | None, ParseStats | None, str | None]:
        """(answer, None, None), or (None, stats of the failure, error text)."""
        try:
            return self.client.complete(prompt, [image]), None, None
        except BudgetExceeded as err:
            return None, ParseStats(unsent=1), str(err)
        except ChatError as err:
            log.warning("pointer request failed: %s", err)
            return None, ParseStats(failed_calls=1), str(err)

    def _single(
        self, view: int, name_index: int, name: str, image: Tensor
    ) -> tuple[list, ParseStats, str | None]:
        h, w = image.shape[:2]  # points are in the render's pixels, whatever size was sent
        sent = downsample_for_pointer(image, self.send_size) if self.send_size else image
        answer, failure, error = self._ask(build_point_prompt(name, self.prompt), sent)
        if answer is None:
            return [], failure, error
        if self.parse == "json_xy":  # pixel xy of the image sent -> percent, as Molmo's
            pairs, stats = parse_xy_json(answer)
            sh, sw = sent.shape[:2]
            points = [ParsedPoint(x / sw * 100.0, y / sh * 100.0) for x, y in pairs]
            if self.max_points is not None and len(points) >= self.max_points:
                points, stats.too_many_points, stats.points = [], 1, 0
        else:
            points, stats = parse_pointer_answer(answer, self.parse, self.max_points)
        return [(u, v, view, name_index) for u, v in points_to_pixels(points, w, h)], stats, None

    def _multi(self, view: int, names: list[str], image: Tensor) -> tuple[list, ParseStats, str | None]:
        prompt = build_multi_point_prompt(names, self.multi_prompt)
        answer, failure, error = self._ask(prompt, image)
        if answer is None:
            return [], failure, error
        per_name, stats = parse_labelled_points(answer, names, prompt=prompt)
        h, w = image.shape[:2]
        rows = [(u, v, view, i) for i, pts in per_name.items() for u, v in points_to_pixels(pts, w, h)]
        if not rows and self.fallback_per_name:
            for i, name in enumerate(names):
                more, more_stats, more_error = self._single(view, i, name, image)
                rows += more
                stats += more_stats
                error = error or more_error
        return rows, stats, error

    def __call__(self, shape: ShapeSample, names: list[str], views: RenderedViews) -> Points2D:
        device = views.images.device
        if not names:
            return Points2D.empty(device)
        images = views.images.detach().cpu()
        calls_before = self.client.calls
        if self.mode == "per_name" or len(names) == 1:
            jobs = [
                (self._single, (v, i, n, images[v]))
                for v in range(views.n_views)
                for i, n in enumerate(names)
            ]
        else:
            jobs = [(self._multi, (v, names, images[v])) for v in range(views.n_views)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            results = list(pool.map(lambda job: job[0](*job[1]), jobs))
        rows: list = []
        stats = ParseStats()
        errors = []
        for r, s, e in results:
            rows += r
            stats += s
            if e:
                errors.append(e)
        uv, view, name_index = _pack(rows, device)
        error = None
        if errors:
            error = f"{stats.failed_calls} of {len(jobs)} pointer requests failed"
            if stats.unsent:
                error += f", {stats.unsent} not sent (failure budget spent)"
            error += f": {errors[0]}"
        return Points2D(uv, view, name_index, stats, calls=self.client.calls - calls_before, error=error)


# ----------------------------------------------------------------------------------------- Molmo
def _check_answer_rules(parse: str, max_points: int | None, send_size: int | None) -> None:
    """One clear error for a bad ``parse`` / ``max_points`` / ``send_size`` (at config time)."""
    if parse not in ("tags", "xml", "json_xy"):
        raise ValueError(f"parse must be 'tags', 'xml' or 'json_xy', got {parse!r}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be >= 1 or null, got {max_points}")
    if send_size is not None and send_size < 1:
        raise ValueError(f"send_size must be >= 1 or null, got {send_size}")


class MolmoWeightsError(FileNotFoundError):
    """The Molmo weights directory is missing or incomplete."""


_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def _check_molmo_dir(weights_dir: str | os.PathLike) -> Path:
    """Validate a local Molmo snapshot before handing it to transformers, with an actionable message
    (transformers' own errors for a half-downloaded snapshot are cryptic, and with HF_HUB_OFFLINE they
    suggest network problems)."""
    path = Path(weights_dir).expanduser()
    hint = (
        "Download the weights once on a machine with internet access, e.g.\n"
        f"  huggingface-cli download allenai/Molmo-7B-D-0924 --local-dir {path}\n"
        "and point `weights_dir` at that folder (it must contain config.json, the *.py remote-code files "
        "and the *.safetensors weights)."
    )
    if not path.is_dir():
        raise MolmoWeightsError(f"Molmo weights directory {path} does not exist.\n{hint}")
    if not (path / "config.json").is_file():
        raise MolmoWeightsError(f"{path} has no config.json: not a Molmo snapshot.\n{hint}")
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise MolmoWeightsError(
            f"{path} has a config.json but no weight files ({', '.join(_WEIGHT_PATTERNS)}).\n{hint}"
        )
    import json

    refs: list[str] = []
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            for ref in json.loads((path / name).read_text()).get("auto_map", {}).values():
                refs.extend(str(r) for r in (ref if isinstance(ref, list) else [ref]) if r)
    # "repo--module.Class" makes transformers import code from ANOTHER repository in the Hub cache,
    # not from this directory: trust_remote_code is granted for this folder's files only.
    foreign = sorted({r for r in refs if "--" in r})
    if foreign:
        raise MolmoWeightsError(
            f"{path}: auto_map points at code outside this directory ({', '.join(foreign)}); refusing "
            "to run remote code that is not in the weights folder"
        )
    modules = {r.split(".")[0] for r in refs}
    missing = sorted(m for m in modules if not (path / f"{m}.py").is_file())
    if missing:
        raise MolmoWeightsError(f"{path} lacks the remote-code files {[m + '.py' for m in missing]}.\n{hint}")
    return path


def load_molmo(weights_dir: str | os.PathLike, device: torch.device | str = "cpu", dtype: str = "bfloat16"):
    """Load Molmo's processor and model from a LOCAL snapshot (``trust_remote_code``, never the hub).

    Version note: Molmo's remote code (``modeling_molmo.py``) breaks on transformers 5 and relies on
    ``PreTrainedModel`` inheriting ``GenerationMixin``, which transformers 4.50 removed (its
    ``generate_from_batch`` calls ``super().generate``); the project therefore pins
    ``transformers>=4.45,<4.50``.

    Returns ``(model, processor)``; the model is in eval mode on ``device``.
    """
    path = _check_molmo_dir(weights_dir)
    from transformers import AutoModelForCausalLM, AutoProcessor

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, local_files_only=True, torch_dtype=torch_dtype
    )
    return model.to(device).eval(), processor


def collate_molmo_inputs(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batch Molmo ``processor.process`` outputs: every tensor is padded along its first dimension
    with -1, which is Molmo's padding value for all four inputs (``input_ids != -1`` is its attention
    mask, images / image masks / image_input_idx use -1 for absent crops). Right padding: Molmo's
    ``generate_from_batch`` derives position ids by cumsum and reads the last *valid* logit, so
    right-padded prompts generate exactly as unpadded ones."""
    if not items:
        raise ValueError("nothing to collate")
    out: dict[str, Tensor] = {}
    for key in items[0]:
        tensors = [item[key] for item in items]
        length = max(t.shape[0] for t in tensors)
        padded = []
        for t in tensors:
            if t.shape[0] < length:
                pad = torch.full((length - t.shape[0], *t.shape[1:]), -1, dtype=t.dtype)
                t = torch.cat([t, pad], dim=0)
            padded.append(t)
        out[key] = torch.stack(padded)
    return out


class MolmoPointer(Pointer):
    """Molmo in process (``AutoModelForCausalLM`` / ``AutoProcessor`` with ``trust_remote_code`` from a
    LOCAL weights dir), prompt ``"Point to the {name} in this image."``, batched over views.

    transformers must stay < 4.50 (see :func:`load_molmo`). The model loads lazily on first use, on
    the device of the rendered views (so each DDP rank gets its own copy on its own GPU). For every
    name, the views go through ``generate_from_batch`` ``batch_size`` at a time (same prompt, so no
    padding waste); the answers are parsed with :func:`parse_molmo_points`.
    """

    def __init__(
        self,
        weights_dir: str,
        dtype: str = "bfloat16",
        batch_size: int = 8,
        max_new_tokens: int = 200,
        prompt: str = DEFAULT_POINT_PROMPT,
        parse: Literal["tags", "xml"] = "tags",
        max_points: int | None = None,
        send_size: int | None = None,
    ) -> None:
        _check_answer_rules(parse, max_points, send_size)
        if parse == "json_xy":
            raise ValueError("MolmoPointer answers in point tags: parse must be 'tags' or 'xml'")
        self.parse, self.max_points, self.send_size = parse, max_points, send_size
        self.weights_dir = weights_dir
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt
        self._model: Any = None
        self._processor: Any = None

    def check(self) -> None:
        _check_molmo_dir(self.weights_dir)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in plain_settings(self).items() if k != "batch_size"}

    def _ensure_loaded(self, device: torch.device) -> None:
        if self._model is None:
            dtype = self.dtype if device.type == "cuda" else "float32"
            self._model, self._processor = load_molmo(self.weights_dir, device, dtype)

    def _sent(self, image: Tensor) -> Tensor:
        """The view as Molmo sees it (``send_size``: the original's bicubic downsample)."""
        return downsample_for_pointer(image, self.send_size) if self.send_size else image

    def process(self, image: Tensor, prompt: str) -> dict[str, Tensor]:
        """One (image, prompt) through Molmo's processor (its ``process`` method, remote code)."""
        from PIL import Image

        array = (image.detach().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
        return self._processor.process(images=[Image.fromarray(array)], text=prompt)

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor]) -> list[str]:
        """Run ``generate_from_batch`` on a collated batch and decode only the new tokens."""
        from transformers import GenerationConfig

        device = next(self._model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        if "images" in batch and batch["images"].is_floating_point():
            batch["images"] = batch["images"].to(next(self._model.parameters()).dtype)
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, stop_strings="<|endoftext|>")
        output = self._model.generate_from_batch(batch, config, tokenizer=self._processor.tokenizer)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        return [self._processor.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]

    def __call__(self, shape: ShapeSample, names: list[str], views: RenderedViews) -> Points2D:
        device = views.images.device
        self._ensure_loaded(device)
        rows: list = []
        stats = ParseStats()
        calls = 0
        size = views.image_size
        for name_index, name in enumerate(names):
            prompt = build_point_prompt(name, self.prompt)
            for start in range(0, views.n_views, self.batch_size):
                view_ids = list(range(start, min(start + self.batch_size, views.n_views)))
                batch = collate_molmo_inputs(
                    [self.process(self._sent(views.images[v]), prompt) for v in view_ids]
                )
                answers = self.generate(batch)
                calls += 1
                for v, answer in zip(view_ids, answers, strict=True):
                    points, s = parse_pointer_answer(answer, self.parse, self.max_points)
                    stats += s
                    rows += [(u, y, v, name_index) for u, y in points_to_pixels(points, size, size)]
        uv, view, name_idx = _pack(rows, device)
        return Points2D(uv, view, name_idx, stats, calls=calls)
