"""``python -m patchalign <verb> ...``

* ``fit | validate | test | predict``: LightningCLI (see :mod:`patchalign.cli`).
* ``export CKPT OUT_DIR``: ``model.safetensors`` + ``config.json`` for :func:`patchalign.load_pretrained`.
* ``demo``: the fresh-machine main job (demo shards → Stage 1 → Stage 2 → zero-shot eval → export → PNGs).

Extra verbs are dispatched here, before LightningCLI runs, because LightningCLI subcommands must be
Trainer methods.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv else ""
    if verb == "export":
        from patchalign.export import main as export_main

        return export_main(argv[1:]) or 0
    if verb == "report":  # the talk's tables from evaluation result files (patchalign.eval.report)
        from patchalign.eval.report import main as report_main

        return report_main(argv[1:])
    if verb == "demo":
        from patchalign.demo import main as demo_main

        return demo_main(argv[1:]) or 0
    from patchalign.cli import cli_main

    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
