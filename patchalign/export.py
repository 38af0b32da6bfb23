"""Export a training checkpoint to a self-contained inference directory.

``export_checkpoint(ckpt, out_dir)`` writes

* ``model.safetensors``: the encoder and its projection head, nothing else (no optimizer, no
  teacher, no EMA, no Lightning state), keys ``encoder.<PatchAlignEncoder parameter>``;
* ``config.json``: ``{"format": "patchalign-pretrained", "encoder": EncoderConfig.to_dict(),
  "text_encoder": <spec>, "logit": {"form", "scale", "bias"}, "templates": [...], ...}``;
* optionally ``encoder.pt2``: a ``torch.export`` program of the encoder for a fixed input size,
  returning ``(patch_features, centers, point_to_patch)``.

The directory loads with :func:`patchalign.pretrained.load_pretrained`, which needs neither
Lightning nor this module. Usage: ``python -m patchalign.export CKPT OUT_DIR [--torch-export]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from patchalign.model import EncoderConfig, PatchAlignEncoder

log = logging.getLogger(__name__)

FORMAT = "patchalign-pretrained"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROGRAM_NAME = "encoder.pt2"
DEFAULT_TEMPLATES = ["{part}", "a {part}", "{part} part"]  # released PatchAlign3D part_only prompts


class _ExportableEncoder(nn.Module):
    """Tensor-tuple front end for ``torch.export`` (``EncoderOutput`` is a dataclass)."""

    def __init__(self, encoder: PatchAlignEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.encoder(points)
        return out.patch_features, out.centers, out.point_to_patch


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - Lightning hparams can hold non-tensor objects
        log.info("weights_only load of %s failed (%s); retrying with full unpickling", path, first)
        return torch.load(path, map_location="cpu", weights_only=False)


def _logit_params(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The patch-text logit parameters: ``sigmoid`` (``exp(scale) * cos + bias``, SigLIP loss) or
    ``scale`` (``min(scale, 100) * cos``, the released BCE loss), from the Stage 2 ``loss`` hparam or,
    failing that, from whether a bias was trained; ``none`` without logit parameters."""
    scale = next((v for k, v in state.items() if k.endswith("logit_scale")), None)
    bias = next((v for k, v in state.items() if k.endswith("logit_bias")), None)
    by_loss = {"siglip": "sigmoid", "bce": "scale"}.get(str(hparams.get("loss")))
    form = by_loss or ("sigmoid" if bias is not None else "scale")
    if scale is None:
        form = "none"
    return {
        "form": form,
        "scale": float(scale) if scale is not None else None,
        "bias": float(bias) if bias is not None else None,
    }


def _text_provenance(hparams: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """Text encoder spec and prompt templates: from the hparams, else from the Stage 2 text bank's
    header (the bank records the encoder id and templates its vectors were made with)."""
    encoder_id, templates = hparams.get("text_encoder"), hparams.get("text_templates")
    bank = hparams.get("text_bank")
    if (encoder_id is None or templates is None) and bank and Path(bank).is_file():
        try:
            with safe_open(str(bank), framework="pt") as f:
                meta = f.metadata() or {}
            encoder_id = encoder_id or meta.get("encoder_id") or None
            templates = templates or json.loads(meta.get("templates", "[]")) or None
        except Exception as e:  # noqa: BLE001 - provenance is best effort; the weights are what matter
            log.warning("could not read text-bank metadata from %s: %s", bank, e)
    return encoder_id, list(templates or DEFAULT_TEMPLATES)


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    torch_export: bool = False,
    num_points: int = 2048,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (and ``encoder.pt2`` if ``torch_export``) to ``out_dir``.

    Args:
        ckpt_path: a Lightning checkpoint: ``state_dict`` with ``encoder.*`` keys (others dropped),
            ``hyper_parameters.encoder_config`` (an ``EncoderConfig`` dict) and optionally
            ``hyper_parameters.text_encoder`` (spec string) and ``text_templates``, or a
            ``text_bank`` path whose safetensors header supplies both (Stage 2 checkpoints).
        out_dir: created if needed; existing files of the same names are replaced.
        torch_export: also save a ``torch.export`` program for ``(1, num_points, 3)`` inputs.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: the checkpoint lacks encoder weights or its config, or the weights do not match
            the config (missing/unexpected/mis-shaped tensors are listed).
    """
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    ckpt = _load_checkpoint(ckpt_path)
    state = ckpt.get("state_dict")
    hp = ckpt.get("hyper_parameters") or {}
    if not isinstance(state, Mapping):
        raise ValueError(f"{ckpt_path}: no 'state_dict' (is this a Lightning checkpoint?)")
    if "encoder_config" not in hp:
        raise ValueError(f"{ckpt_path}: hyper_parameters has no 'encoder_config'")
    enc_cfg = hp["encoder_config"]
    config = enc_cfg if isinstance(enc_cfg, EncoderConfig) else EncoderConfig.from_dict(dict(enc_cfg))
    enc_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc_state:
        raise ValueError(f"{ckpt_path}: state_dict has no 'encoder.*' tensors")
    encoder = PatchAlignEncoder(config)
    try:
        encoder.load_state_dict(enc_state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt_path}: encoder weights do not match encoder_config: {e}") from e
    dropped = sorted({k.split(".", 1)[0] for k in state if not k.startswith("encoder.")})
    tensors = {f"encoder.{k}": v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    text_encoder, text_templates = _text_provenance(hp)
    cfg_json = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": config.to_dict(),
        "text_encoder": text_encoder,
        "logit": _logit_params(state, hp),
        "templates": list(text_templates),
        "source_checkpoint": ckpt_path.name,
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(cfg_json, indent=2))
    log.info(
        "exported %d encoder tensors to %s (dropped: %s)", len(tensors), out, ", ".join(dropped) or "nothing"
    )
    if torch_export:
        export_program(encoder, out / PROGRAM_NAME, num_points)
    return out


def export_program(
    encoder: PatchAlignEncoder, path: str | os.PathLike, num_points: int = 2048, batch_size: int = 1
) -> Path:
    """``torch.export`` the encoder for ``(batch_size, num_points, 3)`` float32 inputs and save it.

    The FPS loop (``num_groups`` steps) is unrolled at trace time, so the program is specialised to
    the configured ``num_groups`` and to the static input size; sizes are not dynamic.
    """
    encoder = encoder.eval()
    example = torch.randn(batch_size, num_points, 3)
    program = torch.export.export(_ExportableEncoder(encoder), (example,))
    path = Path(path)
    torch.export.save(program, str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchalign.export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="Lightning checkpoint (.ckpt)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--torch-export", action="store_true", help="also write encoder.pt2 (torch.export)")
    p.add_argument("--num-points", type=int, default=2048, help="input size of the torch.export program")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    out = export_checkpoint(
        args.ckpt, args.out_dir, torch_export=args.torch_export, num_points=args.num_points
    )
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
