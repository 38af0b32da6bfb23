"""Reading every checkpoint format the project accepts, in one place, with one loading policy.

Three formats are accepted wherever weights are read (``init_from``, ``export``,
:func:`patchalign.load_pretrained`, ``patchalign test --ckpt_path``):

* **Lightning checkpoints** (``*.ckpt``): ``state_dict`` with ``encoder.*`` tensors and
  ``hyper_parameters.encoder_config``.
* **Export directories** (:mod:`patchalign.tools.export`): ``model.safetensors`` (``encoder.*``) and
  ``config.json``.
* **Released PatchAlign3D checkpoints** (``patchalign3d.pt``; Hadgi et al., arXiv 2601.02457, the
  ``save_checkpoint`` of dickoah/PatchAlign3D ``src/training/stage2.py``, and Stage 1's
  ``stage1.py``): ``torch.save({"epoch", "model", "proj", ["temp"], "args"})`` where ``model`` is the
  ``point_transformer.get_model`` state dict (``blocks.blocks.{i}.*``, ``encoder.*``,
  ``reduce_dim.*``, ...), ``proj`` the ``PatchToTextProj`` head (``proj.weight``, ``proj.bias``) and
  ``temp`` the ``LearnableTemp`` (``log_scale``; logit multiplier ``min(exp(log_scale), 100)``).
  The names map onto :class:`~patchalign.model.PatchAlignEncoder` by two renames only:
  ``blocks.blocks.{i}.`` -> ``blocks.{i}.`` and ``proj.`` -> ``head.proj.``.

Policy:

* Every ``torch.load`` is ``weights_only=True``. The non-tensor objects the accepted files hold
  (``OrderedDict`` / ``defaultdict``) are allow-listed (:func:`safe_torch_load`), and anything else
  is refused with the type's name: there is no fallback to full unpickling.
* Loads are strict: every tensor the encoder expects must be present with its shape, and nothing
  else may be there (:func:`load_encoder_state`). ``strict=False`` loads what matches and logs the
  counts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from patchalign.model import EncoderConfig

log = logging.getLogger(__name__)

FORMAT = "patchalign-pretrained"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROGRAM_NAME = "encoder.pt2"
ENCODER_PREFIX = "encoder."

RELEASED_MAX_SCALE = 100.0
RELEASED_NUM_HEADS = 6  # fixed in the released build_model, not stored in the checkpoint

CheckpointKind = Literal["lightning", "export", "released"]
#: What every reader accepts, named in its errors.
EXPECTED_CHECKPOINT = (
    "a Lightning checkpoint (.ckpt), a released PatchAlign3D file (patchalign3d.pt) "
    f"or an export directory ({CONFIG_NAME} + {WEIGHTS_NAME})"
)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model it is loaded into."""


def _base_safe_globals() -> list[Any]:
    import collections

    return [collections.OrderedDict, collections.defaultdict]


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; a refused type is named.

    The allow-list is :func:`_base_safe_globals`; nothing else is ever unpickled. Lightning (>= 2)
    saves ``hyper_parameters`` as a plain ``dict`` and its loop/callback state as plain containers,
    so its checkpoints need no Lightning type and reading one never imports Lightning (core does not
    depend on the training layer; ``tests/test_architecture.py``). Allow-listing Lightning's
    ``AttributeDict`` would not help anyway: the weights-only unpickler fills only ``dict`` /
    ``OrderedDict`` / ``Counter`` items (``SETITEMS``), whatever the allow-list says.

    Raises:
        CheckpointError: the file needs a type outside the allow-list, or is not a ``torch.save``
            file at all (empty, text, truncated, another format): one line naming the file and
            what was expected, never torch's own ``EOFError`` / ``KeyError`` from deep inside.
    """
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): expected {EXPECTED_CHECKPOINT}")
    try:
        with torch.serialization.safe_globals(_base_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "invalid load key" in msg or "Unsupported operand" in msg:  # not a pickle stream (a .npy, ...)
            raise CheckpointError(
                f"{path} is not a torch.save file (not a pickle stream): expected {EXPECTED_CHECKPOINT}"
            ) from e
        first = next((line for line in msg.splitlines() if "GLOBAL" in line or "Unsupported" in line), msg)
        raise CheckpointError(
            f"{path}: refusing to unpickle with weights_only=True (no fallback to full unpickling): "
            f"{first.strip()[:300]}"
        ) from e
    except (EOFError, LookupError, RuntimeError, ValueError) as e:
        # What torch.load raises for a text file (KeyError), a truncated or foreign zip (RuntimeError),
        # random bytes (IndexError) or a file cut inside its pickle (EOFError).
        reason = "not a zip archive or pickle stream"
        if isinstance(e, RuntimeError):  # torch's zip reader: its first sentence says what broke
            reason = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise CheckpointError(
            f"{path} is not a torch.save file ({reason}): expected {EXPECTED_CHECKPOINT}"
        ) from e


@dataclass
class Checkpoint:
    """Encoder weights and provenance read from any accepted format.

    Attributes:
        kind: ``lightning``, ``export`` or ``released``.
        path: where it was read from.
        state: :class:`PatchAlignEncoder` parameter names (no ``encoder.`` prefix), head included
            (``head.proj.*``) when the file has one.
        encoder_config: the architecture (from hparams, ``config.json``, or inferred from the
            released tensors' shapes); ``None`` for a Lightning checkpoint without hparams.
        logit: ``{"form", "scale", "bias", "max_scale"}`` (see :func:`patchalign.losses.logit_multiplier`).
        text_encoder: spec of the text encoder the head was aligned to, if known.
        templates: prompt templates the head was aligned with, if known.
        hparams: Lightning hyper-parameters, the export's ``config.json`` or the released ``args``.
        extra: other state (e.g. the logit parameters' tensors, ``epoch``, ``global_step``).
    """

    kind: CheckpointKind
    path: Path
    state: dict[str, Tensor]
    encoder_config: EncoderConfig | None
    logit: dict[str, Any] = field(default_factory=lambda: {"form": "none"})
    text_encoder: str | None = None
    templates: list[str] | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_head(self) -> bool:
        return any(k.startswith("head.") for k in self.state)


def detect_kind(path: str | os.PathLike, obj: Any = None) -> CheckpointKind:
    """Which format ``path`` is (``obj``: the already-loaded file, to avoid a second read)."""
    p = Path(path)
    if p.is_dir():
        if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
            return "export"
        raise CheckpointError(f"{p} is a directory without {CONFIG_NAME} + {WEIGHTS_NAME}: not an export")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    obj = safe_torch_load(p) if obj is None else obj
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return "lightning"
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return "released"
    keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{p}: neither a Lightning checkpoint ('state_dict') nor a released PatchAlign3D file "
        f"('model', 'proj'); top level: {keys}"
    )


def strip_prefix(state: Mapping[str, Tensor], prefix: str = ENCODER_PREFIX) -> dict[str, Tensor]:
    """The tensors under ``prefix``, with it removed (the one place the prefix is handled)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_ddp(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` prefix that ``DistributedDataParallel.state_dict()`` adds, if every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def released_to_encoder_state(
    model_state: Mapping[str, Tensor], proj_state: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Rename released ``get_model`` + ``PatchToTextProj`` tensors to :class:`PatchAlignEncoder` names.

    Only two renames: ``blocks.blocks.{i}.`` -> ``blocks.{i}.`` (the released ``TransformerEncoder``
    wraps its ``ModuleList`` one level deeper) and ``proj.*`` -> ``head.proj.*``. Every other key is
    kept as it is, so an unexpected tensor shows up in the strict load's report.
    """
    out: dict[str, Tensor] = {}
    for k, v in _strip_ddp(model_state).items():
        out[k.replace("blocks.blocks.", "blocks.", 1) if k.startswith("blocks.blocks.") else k] = v
    for k, v in _strip_ddp(proj_state or {}).items():
        out[f"head.{k}"] = v
    return out


def released_encoder_config(state: Mapping[str, Tensor], args: Mapping[str, Any] | None) -> EncoderConfig:
    """The architecture of a released checkpoint, from its tensors' shapes and its ``args``.

    Widths and depth come from the shapes; ``num_group`` / ``group_size`` from ``args`` (released
    defaults 128 / 32); the head count is fixed at 6 by the released ``build_model``. Numerics are
    the released ones: block LayerNorm eps 1e-5 and the pointnet2 FPS rule.
    """
    args = dict(args or {})
    need = ["norm.weight", "encoder.second_conv.3.weight", "blocks.0.mlp.fc1.weight"]
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"released checkpoint lacks {absent}: cannot infer its architecture")
    # widths from the tensors that define them (not from reduce_dim, so a broken reduce_dim is
    # reported as mis-shaped by the strict load instead of silently changing the architecture)
    trans_dim = state["norm.weight"].shape[0]
    encoder_dims = state["encoder.second_conv.3.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head = state.get("head.proj.weight")
    return EncoderConfig(
        num_groups=int(args.get("num_group", 128)),
        group_size=int(args.get("group_size", 32)),
        encoder_dims=int(encoder_dims),
        trans_dim=int(trans_dim),
        depth=depth,
        num_heads=RELEASED_NUM_HEADS,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / trans_dim,
        drop_path_rate=0.1,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        head_dim=int(head.shape[0]) if head is not None else 0,
        up_axis="y",
        fps_start=0,
        fps_rule="pointnet2",
        norm_eps=1e-5,
    )


def _read_released(path: Path, obj: Mapping[str, Any]) -> Checkpoint:
    model_state, proj_state = obj["model"], obj.get("proj")
    if proj_state is not None and not isinstance(proj_state, Mapping):
        raise CheckpointError(f"{path}: 'proj' is {type(proj_state).__name__}, not a state dict")
    state = released_to_encoder_state(model_state, proj_state)
    args = dict(obj.get("args") or {})
    config = released_encoder_config(state, args)
    temp = obj.get("temp")
    logit: dict[str, Any] = {"form": "none"}
    if isinstance(temp, Mapping) and "log_scale" in temp and temp["log_scale"] is not None:
        logit = {
            "form": "log_scale",
            "scale": float(temp["log_scale"]),
            "bias": None,
            "max_scale": RELEASED_MAX_SCALE,
        }
    elif isinstance(temp, Mapping) and "scale" in temp and temp["scale"] is not None:  # mode="linear"
        logit = {
            "form": "scale",
            "scale": float(temp["scale"]),
            "bias": None,
            "max_scale": RELEASED_MAX_SCALE,
        }
    text_encoder = None
    if proj_state is not None and temp is not None:  # a Stage 2 file: aligned to the CLIP text tower
        name = args.get("clip_model", "ViT-bigG-14")
        pre = args.get("clip_pretrained", "laion2b_s39b_b160k")
        text_encoder = f"open_clip:{name}@{pre}" if pre else f"open_clip:{name}"
    from patchalign.text import PROMPT_TEMPLATES

    return Checkpoint(
        kind="released",
        path=path,
        state=state,
        encoder_config=config,
        logit=logit,
        text_encoder=text_encoder,
        templates=list(PROMPT_TEMPLATES["part_only"]) if text_encoder else None,
        hparams=args,
        extra={"epoch": obj.get("epoch")},
    )


def lightning_logit(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The Stage 2 logit form and values of a Lightning checkpoint (``none`` without logit parameters).

    ``loss: siglip`` -> ``sigmoid`` (``exp(t) cos + b``); ``loss: bce`` -> ``log_scale`` (released
    ``min(exp(s), 100) cos``) or ``scale`` (``min(s, 100) cos``, ``temperature: linear`` and
    checkpoints older than the ``temperature`` option); without a ``loss`` hparam the form follows
    from whether a bias was trained.
    """
    scale = next((v for k, v in state.items() if k.endswith("logit_scale")), None)
    bias = next((v for k, v in state.items() if k.endswith("logit_bias")), None)
    if scale is None:
        return {"form": "none"}
    loss = hparams.get("loss")
    if loss == "siglip" or (loss is None and bias is not None):
        form = "sigmoid"
    else:
        form = "log_scale" if hparams.get("temperature") == "log" else "scale"
    return {
        "form": form,
        "scale": float(scale),
        "bias": float(bias) if (bias is not None and form == "sigmoid") else None,
        "max_scale": float(hparams.get("max_logit_scale", RELEASED_MAX_SCALE)),
    }


def _read_lightning(path: Path, obj: Mapping[str, Any]) -> Checkpoint:
    full = obj["state_dict"]
    hp = dict(obj.get("hyper_parameters") or {})
    state = strip_prefix(full)
    if not state:
        raise CheckpointError(f"{path}: state_dict has no '{ENCODER_PREFIX}*' tensors")
    enc_cfg = hp.get("encoder_config")
    config = None
    if enc_cfg is not None:
        config = enc_cfg if isinstance(enc_cfg, EncoderConfig) else EncoderConfig.from_dict(dict(enc_cfg))
    return Checkpoint(
        kind="lightning",
        path=path,
        state=state,
        encoder_config=config,
        logit=lightning_logit(full, hp),
        text_encoder=hp.get("text_encoder"),
        templates=list(hp["text_templates"]) if hp.get("text_templates") else None,
        hparams=hp,
        extra={
            "epoch": obj.get("epoch"),
            "global_step": obj.get("global_step"),
            "other_modules": sorted({k.split(".", 1)[0] for k in full if not k.startswith(ENCODER_PREFIX)}),
        },
    )


def _read_export(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    cfg_file = path / CONFIG_NAME
    try:
        config = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not JSON ({e}): expected the config.json of an export") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfg_file} is not a patchalign export (format={fmt!r})")
    if not isinstance(config.get("encoder"), dict):
        raise CheckpointError(f"{cfg_file} has no 'encoder' architecture (an export records one)")
    try:
        state = strip_prefix(load_file(str(path / WEIGHTS_NAME)))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise CheckpointError(
            f"{path / WEIGHTS_NAME} is not a readable safetensors file ({type(e).__name__}: {e})"
        ) from e
    return Checkpoint(
        kind="export",
        path=path,
        state=state,
        encoder_config=EncoderConfig.from_dict(config["encoder"]),
        logit=dict(config.get("logit") or {"form": "none"}),
        text_encoder=config.get("text_encoder"),
        templates=list(config["templates"]) if config.get("templates") else None,
        hparams=config,
        extra={"epoch": config.get("epoch"), "global_step": config.get("global_step")},
    )


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a Lightning checkpoint, an export directory or a released PatchAlign3D file.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: an unknown layout, or a type the ``weights_only`` allow-list refuses.
    """
    p = Path(path)
    if p.is_dir():
        detect_kind(p)
        return _read_export(p)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    obj = safe_torch_load(p)
    kind = detect_kind(p, obj)
    return _read_lightning(p, obj) if kind == "lightning" else _read_released(p, obj)


@dataclass
class LoadReport:
    """What :func:`load_encoder_state` did: tensors loaded and the keys that did not match."""

    loaded: int
    expected: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 12) -> str:
        def part(name: str, keys: list[str]) -> str:
            more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return f"{len(keys)} {name}: {keys[:limit]}{more}"

        parts = [
            part(n, k)
            for n, k in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("mis-shaped", self.mismatched),
            )
            if k
        ]
        return f"{self.loaded}/{self.expected} tensors match; " + "; ".join(parts)


def load_encoder_state(
    encoder: nn.Module,
    state: Mapping[str, Tensor],
    *,
    strict: bool = True,
    skip_head: bool = False,
    source: str = "checkpoint",
) -> LoadReport:
    """Load ``state`` (encoder names, no prefix) into ``encoder``: all of it, or fail saying what differs.

    Args:
        skip_head: leave ``head.*`` out on both sides (Stage 1 -> Stage 2 starts a new head).
        strict: ``True`` (default) raises unless every expected tensor is present with its shape
            and nothing unexpected is there; ``False`` loads the matching tensors and logs the counts.
        source: named in messages.

    Raises:
        CheckpointError: strict and anything missing, unexpected or mis-shaped (all listed).
    """
    own = encoder.state_dict()
    if skip_head:
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    bad = {m.split(":", 1)[0] for m in mismatched}
    usable = {k: v for k, v in state.items() if k in own and k not in bad}
    report = LoadReport(len(usable), len(own), missing, unexpected, mismatched)
    if not report.complete:
        if strict:
            raise CheckpointError(
                f"{source} does not match the encoder: {report.describe()}. Fix the architecture "
                "(encoder config) or pass strict: false to load only the matching tensors."
            )
        log.warning("strict=False: loading a partial state from %s: %s", source, report.describe())
    encoder.load_state_dict(usable, strict=False)
    return report


def load_checkpoint_into(
    encoder: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    skip_head: bool = False,
) -> tuple[Checkpoint, LoadReport]:
    """:func:`read_checkpoint` then :func:`load_encoder_state` (``init_from`` in both stages)."""
    ckpt = read_checkpoint(path)
    if not skip_head and not ckpt.has_head:
        raise CheckpointError(f"{path} has no projection head ({ckpt.kind} file): load it with skip_head")
    report = load_encoder_state(encoder, ckpt.state, strict=strict, skip_head=skip_head, source=str(path))
    return ckpt, report


def effective_multiplier(logit: Mapping[str, Any]) -> float:
    """Readable multiplier of cosines for a logit dict (for config.json; computed by the losses' rule)."""
    from patchalign.losses import DEFAULT_LOGIT_SCALE, logit_multiplier

    form = logit.get("form", "none")
    if form == "none" or logit.get("scale") is None:
        return DEFAULT_LOGIT_SCALE
    m = logit_multiplier(
        form, torch.tensor(float(logit["scale"])), logit.get("max_scale", RELEASED_MAX_SCALE)
    )
    return float(m) if math.isfinite(float(m)) else DEFAULT_LOGIT_SCALE


def write_export(
    encoder: nn.Module,
    out_dir: str | os.PathLike,
    *,
    text_encoder: str | None,
    templates: list[str],
    logit: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write an export directory: ``model.safetensors`` (``encoder.*``) + ``config.json``.

    The one writer of the format :func:`read_checkpoint` reads back (``python -m patchalign export``,
    :meth:`patchalign.pretrained.PretrainedPatchAlign.save_pretrained`). ``provenance`` adds keys
    such as the source checkpoint, epoch and step. Whether an earlier export may be replaced is the
    caller's decision; this writes.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    config = getattr(encoder, "config", None)
    if config is None:
        raise CheckpointError("write_export needs a PatchAlignEncoder (its .config is the architecture)")
    tensors = {
        f"{ENCODER_PREFIX}{k}": v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()
    }
    logit = dict(logit)
    if logit.get("form", "none") != "none":
        logit["multiplier"] = effective_multiplier(logit)
    cfg_json = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": config.to_dict(),
        "text_encoder": text_encoder,
        "logit": logit,
        "templates": list(templates),
        **dict(provenance or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(cfg_json, indent=2))
    return out
