"""``python -m zerokey {predict,evaluate,bench} ...``

``predict`` goes through LightningCLI (``--config configs/zerokey.yaml``; every Trainer option and the
namer / pointer ``class_path`` / ``init_args`` are configurable). ``evaluate`` and ``bench`` are not
Trainer methods, and LightningCLI only accepts Trainer methods as subcommands, so they are dispatched
here *before* LightningCLI parses anything.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXTRA_VERBS = ("evaluate", "bench")


def cli_main(argv: Sequence[str] | None = None):
    """LightningCLI over :class:`ZeroKeyModule` / :class:`ZeroKeyDataModule`.

    ``save_config_kwargs={"overwrite": True}``: LightningCLI's SaveConfigCallback refuses to overwrite
    the ``config.yaml`` it writes into the log dir, so a second run in the same folder would crash.
    """
    from lightning.pytorch.cli import LightningCLI

    from zerokey.module import ZeroKeyDataModule, ZeroKeyModule

    return LightningCLI(
        ZeroKeyModule,
        ZeroKeyDataModule,
        args=list(argv) if argv is not None else None,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "evaluate":
        from zerokey.evaluate import main as evaluate_main

        evaluate_main(args[1:])
    elif args and args[0] == "bench":
        from zerokey.bench import main as bench_main

        bench_main(args[1:])
    else:
        # From the command line let LightningCLI read sys.argv itself (it warns when given both).
        cli_main(None if argv is None else args)


if __name__ == "__main__":
    main()
