"""LightningCLI for training, validation, testing and prediction.

``python -m patchalign fit|validate|test|predict --config configs/stage1.yaml``. Extra verbs that are
not Trainer methods (``export``, ``demo``) are dispatched by :mod:`patchalign.__main__` before
LightningCLI parses anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def data_target_widths(data: Any) -> dict[str, int]:
    """Widths the model's head must match, read from the data module's manifest and text bank.

    Linked into the model (``model.init_args.target_widths``) so the head width is never typed twice:
    Stage 1 takes ``features`` (teacher width), Stage 2 takes ``text`` (text-bank width).
    """
    widths: dict[str, int] = {}
    path = getattr(data, "data_path", None)
    if path is None:
        return widths
    from patchalign.data.textbank import load_text_bank
    from patchalign.data.writer import read_manifest

    manifest = read_manifest(path)
    if manifest.feature_dim:
        widths["features"] = int(manifest.feature_dim)
    bank_path = getattr(data, "text_bank_path", None) or manifest.text_bank_path()
    if bank_path is not None and Path(bank_path).exists():
        widths["text"] = load_text_bank(bank_path).dim
    return widths


class PatchAlignCLI(LightningCLI):
    """LightningCLI with the data→model links and requeue-safe config saving."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.init_args.target_widths", compute_fn=data_target_widths, apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        """Put checkpoints in ``<default_root_dir>/checkpoints`` unless a dirpath is given.

        One override (``--trainer.default_root_dir``) then moves a whole run, and the path is the same
        on every Slurm requeue, so ``--ckpt_path last`` and the requeue checkpoint find their files.
        """
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is None:
            return
        root = Path(trainer.get("default_root_dir") or ".")
        for cb in trainer.get("callbacks") or []:
            if str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
                args = cb.get("init_args")
                if args is not None and args.get("dirpath") is None:
                    args["dirpath"] = str(root / "checkpoints")


def cli_main(args: list[str] | None = None, run: bool = True) -> PatchAlignCLI:
    """Entry point used by ``python -m patchalign`` and by the demo (``args`` given explicitly)."""
    return PatchAlignCLI(
        # A requeued Slurm job re-runs the same command into the same log dir: overwrite its config.
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )
