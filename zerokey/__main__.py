"""``python -m zerokey {predict,evaluate,bench,describe} ...``

``predict`` goes through LightningCLI (``--config configs/zerokey.yaml``; every Trainer option and the
namer / pointer ``class_path`` / ``init_args`` are configurable). ``evaluate`` and ``bench`` are not
Trainer methods, and LightningCLI only accepts Trainer methods as subcommands, so they are dispatched
here *before* LightningCLI parses anything.

A run that cannot start or must stop (server down, failure budget spent, a run folder holding another
run, a missing data folder, a config that cannot be built) raises :class:`zerokey.writer.ZeroKeyRunError`;
a command line that does not parse (a misspelled key) raises jsonargparse's ``ArgumentError``. Both
are printed as one line and the exit status is 2 (``JSONARGPARSE_DEBUG=1`` shows the traceback of a
config that cannot be built).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from jsonargparse import ArgumentError
from lightning.pytorch.cli import SaveConfigCallback

from zerokey.writer import ZeroKeyRunError


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


def _one_line(err: BaseException) -> str:
    """The innermost cause of an error (jsonargparse wraps a class's own error in its union / type
    messages), as one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class ZeroKeyCLI(LightningCLI):
        """LightningCLI whose config problems are one line (:class:`ZeroKeyRunError`), not a traceback."""

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            config = self.config.get(self.config.get("subcommand") or "", self.config)
            root = (config.get("data") or {}).get("keypointnet_root")
            if root and not os.path.isdir(root):  # before anything is built or logged
                raise ZeroKeyRunError(f"data.keypointnet_root {root} does not exist (KeypointNet folder)")

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ZeroKeyRunError:
                raise
            except Exception as err:  # noqa: BLE001 - a config that cannot be built: say why in one line
                if os.environ.get("JSONARGPARSE_DEBUG"):
                    raise
                raise ZeroKeyRunError(f"the config cannot be built: {_one_line(err)}") from err

    return ZeroKeyCLI


def cli_main(argv: Sequence[str] | None = None):
    """LightningCLI over :class:`ZeroKeyModule` / :class:`ZeroKeyDataModule`."""
    from jsonargparse import set_parsing_settings

    # ``${data.keypointnet_root}`` in a config means the top-level key, although LightningCLI parses
    # the config under its ``predict`` subcommand.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    from zerokey.module import ZeroKeyDataModule, ZeroKeyModule

    return _cli_class()(
        ZeroKeyModule,
        ZeroKeyDataModule,
        args=list(argv) if argv is not None else None,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": False},
        # OmegaConf interpolation, resolved after the command line is applied ("omegaconf+"), so a
        # path given once (e.g. ``data.keypointnet_root``) feeds every place that needs it and an
        # override on the command line moves them all. Parse errors raise (one line, in ``main``)
        # instead of printing the whole usage first.
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "exit_on_error": False,
            "predict": {"exit_on_error": False},
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "evaluate":
            from zerokey.evaluate import main as evaluate_main

            evaluate_main(args[1:])
        elif args and args[0] == "describe":
            from zerokey.describe import main as describe_main

            describe_main(args[1:])
        elif args and args[0] == "bench":
            from zerokey.bench import main as bench_main

            bench_main(args[1:])
        else:
            # From the command line let LightningCLI read sys.argv itself (it warns when given both).
            cli_main(None if argv is None else args)
    except ZeroKeyRunError as err:
        print(f"zerokey: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except ArgumentError as err:
        hint = f"python -m zerokey {args[0] if args else ''} --help lists the options".replace("  ", " ")
        print(f"zerokey: error: {_one_line(err)} ({hint})", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
