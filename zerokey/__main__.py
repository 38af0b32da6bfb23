"""``python -m zerokey {predict,evaluate,bench} ...``

``predict`` goes through LightningCLI (``--config configs/zerokey.yaml``; every Trainer option and the
namer / pointer ``class_path`` / ``init_args`` are configurable). ``evaluate`` and ``bench`` are not
Trainer methods, and LightningCLI only accepts Trainer methods as subcommands, so they are dispatched
here *before* LightningCLI parses anything.

A run that cannot start or must stop (server down, failure budget spent, a run folder holding another
run) raises :class:`zerokey.writer.ZeroKeyRunError`; it is printed as one line and the exit status is 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import SaveConfigCallback


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's config saver that never overwrites: the first attempt of a run folder writes
    ``config.yaml``, each resume ``config.resume<N>.yaml`` next to it (the writer has already checked
    that the method settings match, or refused)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and trainer.log_dir is not None:
            base, n = "config.yaml", 1
            name = base
            while os.path.exists(os.path.join(trainer.log_dir, name)):
                name = f"config.resume{n}.yaml"
                n += 1
            self.config_filename = trainer.strategy.broadcast(name, src=0)
        super().setup(trainer, pl_module, stage)


def cli_main(argv: Sequence[str] | None = None):
    """LightningCLI over :class:`ZeroKeyModule` / :class:`ZeroKeyDataModule`."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    # ``${data.keypointnet_root}`` in a config means the top-level key, although LightningCLI parses
    # the config under its ``predict`` subcommand.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    from zerokey.module import ZeroKeyDataModule, ZeroKeyModule

    return LightningCLI(
        ZeroKeyModule,
        ZeroKeyDataModule,
        args=list(argv) if argv is not None else None,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": False},
        # OmegaConf interpolation, resolved after the command line is applied ("omegaconf+"), so a
        # path given once (e.g. ``data.keypointnet_root``) feeds every place that needs it and an
        # override on the command line moves them all.
        parser_kwargs={"parser_mode": "omegaconf+"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    from zerokey.writer import ZeroKeyRunError

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "evaluate":
            from zerokey.evaluate import main as evaluate_main

            evaluate_main(args[1:])
        elif args and args[0] == "bench":
            from zerokey.bench import main as bench_main

            bench_main(args[1:])
        else:
            # From the command line let LightningCLI read sys.argv itself (it warns when given both).
            cli_main(None if argv is None else args)
    except ZeroKeyRunError as err:
        print(f"zerokey: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
