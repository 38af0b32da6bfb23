"""``python -m patchalign <verb> ...``

* ``fit | validate | test | predict``: LightningCLI (see :mod:`patchalign.training.cli`).
* ``export CKPT OUT_DIR``: ``model.safetensors`` + ``config.json`` for :func:`patchalign.load_pretrained`.
* ``report``: the talk's tables from evaluation result files (:mod:`patchalign.eval.report`).
* ``demo``: the fresh-machine main job (demo shards → Stage 1 → Stage 2 → zero-shot eval → export → PNGs).
* ``shards``: the data engine that builds training shards (:mod:`patchalign.engine`).
* ``bench``: every benchmark (:mod:`patchalign.tools.bench`).
* ``segment``: label users' meshes and clouds at full resolution (:mod:`patchalign.tools.segment`).
* ``app``: the same in the browser (Gradio, the ``app`` extra; :mod:`patchalign.tools.app`).

Extra verbs are dispatched here, before LightningCLI runs, because LightningCLI subcommands must be
Trainer methods.
"""

from __future__ import annotations

import importlib
import sys

#: verb -> module whose ``main(argv)`` runs it (imported only when that verb is used).
EXTRA_VERBS = {
    "export": "patchalign.tools.export",
    "report": "patchalign.eval.report",
    "demo": "patchalign.tools.demo",
    "shards": "patchalign.engine.__main__",
    "bench": "patchalign.tools.bench.__main__",
    "segment": "patchalign.tools.segment",
    "app": "patchalign.tools.app",
}


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status (2 and one line on stderr for a bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verb = args[0] if args else ""
    if verb in EXTRA_VERBS:
        return importlib.import_module(EXTRA_VERBS[verb]).main(args[1:]) or 0
    from patchalign.training.cli import run_cli

    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
