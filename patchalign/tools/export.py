"""Export a checkpoint to a self-contained inference directory.

``export_checkpoint(ckpt, out_dir)`` reads any format :mod:`patchalign.checkpoints` accepts (a
Lightning checkpoint, a released PatchAlign3D ``patchalign3d.pt``, or another export) and writes

* ``model.safetensors``: the encoder and its projection head, nothing else (no optimizer, no
  teacher, no EMA, no Lightning state), keys ``encoder.<PatchAlignEncoder parameter>``;
* ``config.json``: ``{"format": "patchalign-pretrained", "encoder": EncoderConfig.to_dict(),
  "text_encoder": <spec>, "logit": {"form", "scale", "bias", "max_scale", "multiplier"},
  "templates": [...], ...}``. A released file records OpenCLIP ViT-bigG-14 / laion2b_s39b_b160k and
  the ``log_scale`` form, whose multiplier is ``min(exp(temp.log_scale), 100)`` as released;
* optionally ``encoder.pt2``: a ``torch.export`` program of the encoder for a fixed input size,
  returning ``(patch_features, centers, point_to_patch)``.

The directory loads with :func:`patchalign.pretrained.load_pretrained`, which needs neither
Lightning nor this module. Usage: ``python -m patchalign export CKPT OUT_DIR [--torch-export]
[--overwrite]``. An ``OUT_DIR`` that already holds an export is refused unless ``--overwrite``: an
earlier export (say, Stage 2) is never replaced by accident (say, by Stage 1).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from patchalign.checkpoints import (
    CONFIG_NAME,
    FORMAT,
    PROGRAM_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_encoder_state,
    read_checkpoint,
    write_export,
)
from patchalign.model import PatchAlignEncoder
from patchalign.text import DEFAULT_TEMPLATES, normalize_template

log = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "FORMAT", "PROGRAM_NAME", "WEIGHTS_NAME", "export_checkpoint", "export_program"]


class _ExportableEncoder(nn.Module):
    """Tensor-tuple front end for ``torch.export`` (``EncoderOutput`` is a dataclass)."""

    def __init__(self, encoder: PatchAlignEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.encoder(points)
        return out.patch_features, out.centers, out.point_to_patch


def _text_provenance(
    encoder_id: str | None, templates: list[str] | None, hparams: Mapping[str, Any]
) -> tuple[str | None, list[str]]:
    """Text encoder spec and prompt templates: as recorded, else from the Stage 2 text bank's
    header (the bank records the encoder id and templates its vectors were made with)."""
    bank = hparams.get("text_bank")
    if (encoder_id is None or templates is None) and bank and Path(bank).is_file():
        try:
            with safe_open(str(bank), framework="pt") as f:
                meta = f.metadata() or {}
            encoder_id = encoder_id or meta.get("encoder_id") or None
            templates = templates or json.loads(meta.get("templates", "[]")) or None
        except Exception as e:  # noqa: BLE001 - provenance is best effort; the weights are what matter
            log.warning("could not read text-bank metadata from %s: %s", bank, e)
    return encoder_id, [normalize_template(t) for t in (templates or DEFAULT_TEMPLATES)]


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    torch_export: bool = False,
    num_points: int = 2048,
    strict: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (and ``encoder.pt2`` if ``torch_export``) to ``out_dir``.

    Args:
        ckpt_path: a Lightning checkpoint (``state_dict`` with ``encoder.*`` keys, others dropped;
            ``hyper_parameters.encoder_config``; optionally ``text_encoder`` / ``text_templates`` or
            a ``text_bank`` path whose safetensors header supplies both), a released
            ``patchalign3d.pt``, or an export directory.
        out_dir: created if needed. If it already holds an export's files it is refused, unless
            ``overwrite``.
        torch_export: also save a ``torch.export`` program for ``(1, num_points, 3)`` inputs.
        strict: refuse weights that do not match the architecture (default); ``False`` exports the
            matching tensors (the rest keep their initialisation) and logs the counts.
        overwrite: replace an earlier export in ``out_dir`` (a stale ``encoder.pt2`` it left is
            removed when no new program is written, so the directory never mixes two models).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: the checkpoint lacks encoder weights or its config, or the weights do not match
            the config (missing/unexpected/mis-shaped tensors are listed).
        FileExistsError: ``out_dir`` holds an export and ``overwrite`` is false, or ``out_dir`` is
            the export being read.
    """
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    _check_out_dir(ckpt_path, out, overwrite)
    ckpt = read_checkpoint(ckpt_path)
    if ckpt.encoder_config is None:
        raise CheckpointError(f"{ckpt_path}: hyper_parameters has no 'encoder_config'")
    encoder = PatchAlignEncoder(ckpt.encoder_config)
    load_encoder_state(encoder, ckpt.state, strict=strict, source=str(ckpt_path))
    text_encoder, text_templates = _text_provenance(ckpt.text_encoder, ckpt.templates, ckpt.hparams)
    if not torch_export:
        (out / PROGRAM_NAME).unlink(missing_ok=True)  # only reachable with overwrite (checked above)
    write_export(
        encoder,
        out,
        text_encoder=text_encoder,
        templates=list(text_templates),
        logit=ckpt.logit,
        provenance={
            "source_checkpoint": ckpt_path.name,
            "source_format": ckpt.kind,
            "epoch": ckpt.extra.get("epoch"),
            "global_step": ckpt.extra.get("global_step"),
        },
    )
    dropped = ", ".join(ckpt.extra.get("other_modules") or []) or "nothing"
    log.info(
        "exported %d encoder tensors from a %s file to %s (dropped: %s)",
        len(encoder.state_dict()),
        ckpt.kind,
        out,
        dropped,
    )
    if torch_export:
        export_program(encoder, out / PROGRAM_NAME, num_points)
    return out


def _check_out_dir(ckpt_path: Path, out: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier export unless told to, and never write over the files being read."""
    if out.exists() and ckpt_path.exists() and out.resolve() == ckpt_path.resolve():
        raise FileExistsError(f"{out} is the export being read: choose another output directory")
    existing = [n for n in (WEIGHTS_NAME, CONFIG_NAME, PROGRAM_NAME) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds an export ({', '.join(existing)}): pass --overwrite to replace it, "
            "or choose another directory"
        )


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


def export(
    ckpt: str,
    out_dir: str,
    torch_export: bool = False,
    num_points: int = 2048,
    non_strict: bool = False,
    overwrite: bool = False,
) -> int:
    """Export a checkpoint to a self-contained inference directory (model.safetensors + config.json).

    Args:
        ckpt: Lightning checkpoint (.ckpt), released patchalign3d.pt, or an export directory.
        out_dir: output directory; one that already holds an export is refused unless --overwrite.
        torch_export: also write encoder.pt2 (a torch.export program of the encoder).
        num_points: input size of the torch.export program.
        non_strict: export even if tensors are missing/unexpected/mis-shaped (logs the counts).
        overwrite: replace an export already in out_dir.
    """
    logging.basicConfig(level=logging.INFO)
    out = export_checkpoint(
        ckpt, out_dir, torch_export=torch_export, num_points=num_points, strict=not non_strict,
        overwrite=overwrite,
    )  # fmt: skip
    print(f"exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m patchalign export CKPT OUT_DIR [--torch-export] [--non-strict] [--overwrite]``."""
    from patchalign.argv import run_cli

    # CheckpointError is a ValueError; FileNotFoundError / FileExistsError are OSErrors.
    return run_cli(export, argv, prog="python -m patchalign export", errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
