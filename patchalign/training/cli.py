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
        """Route non-Lightning ``--ckpt_path`` files to ``init_from``; put checkpoints under the run dir.

        ``validate/test/predict --ckpt_path`` accepts what ``init_from`` does: an export directory
        or a released PatchAlign3D ``.pt`` cannot be restored by Lightning (no trainer state), so it
        becomes ``model.init_args.init_from`` with ``init_head: true`` and the strict load applies.

        Checkpoints go to ``<default_root_dir>/checkpoints`` unless a dirpath is given. One
        override (``--trainer.default_root_dir``) then moves a whole run, and the path is the same
        on every Slurm requeue, so ``--ckpt_path last`` and the requeue checkpoint find their files.
        """
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        self._route_foreign_ckpt_path(cfg)
        trainer = cfg.get("trainer")
        if trainer is None:
            return
        root = Path(trainer.get("default_root_dir") or ".")
        for cb in trainer.get("callbacks") or []:
            if str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
                args = cb.get("init_args")
                if args is not None and args.get("dirpath") is None:
                    args["dirpath"] = str(root / "checkpoints")

    def _route_foreign_ckpt_path(self, cfg: Any) -> None:
        ckpt_path = cfg.get("ckpt_path") if hasattr(cfg, "get") else None
        if not ckpt_path or self.subcommand not in ("validate", "test", "predict"):
            return
        if str(ckpt_path) in ("last", "best", "hpc", "registry"):
            return
        from patchalign.checkpoints import detect_kind

        kind = detect_kind(ckpt_path)
        if kind == "lightning":
            return
        model = cfg.get("model")
        init_args = model.get("init_args") if model is not None else None
        if init_args is None or "init_from" not in init_args:
            raise ValueError(
                f"--ckpt_path {ckpt_path} is a {kind} file, which only a model with init_from "
                "(patchalign.training.modules.Stage2Alignment) can load"
            )
        init_args["init_from"] = str(ckpt_path)
        init_args["init_head"] = True
        cfg["ckpt_path"] = None
        print(f"--ckpt_path {ckpt_path}: {kind} format, loaded through model.init_args.init_from (strict)")


def cli_main(args: list[str] | None = None, run: bool = True) -> PatchAlignCLI:
    """Entry point used by ``python -m patchalign`` and by the demo (``args`` given explicitly)."""
    return PatchAlignCLI(
        # A requeued Slurm job re-runs the same command into the same log dir: overwrite its config.
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
