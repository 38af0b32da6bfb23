"""Lightning callback: the best / worst pictures of a ``patchalign test`` benchmark run.

The script path (:func:`~patchalign.eval.evaluator.run_zero_shot_eval` with ``viz_per_category``)
draws the best and worst shapes of each category; this callback gives the CLI path the same
pictures, in ``<eval_out_dir>/eval/viz/`` beside the ``results.json`` the Stage 2 test hooks write,
where ``python -m patchalign report`` finds them. It runs after the test loop (``on_test_end``, once
the LightningModule has computed and saved its report) and re-runs only the chosen shapes.

Why a callback rather than code in the LightningModule: pictures are an evaluation product, not a
training concern, and a config switches them on or off without touching the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class BestWorstPictures(L.Callback):
    """Render the ``per_category`` best and worst shapes of each category after ``test``.

    Args:
        per_category: shapes per category and side (``0`` switches the callback off).
        convention: the mIoU convention that ranks the shapes (``released``, ``pointbert``, ``find3d``).
        out_dir: where to write; default ``<model eval_out_dir or trainer root>/eval/viz`` (next to the
            results the LightningModule writes).
    """

    def __init__(
        self, per_category: int = 1, convention: str = "released", out_dir: str | None = None
    ) -> None:
        from patchalign.eval.metrics import CONVENTIONS

        if per_category < 0:
            raise ValueError(f"per_category must be >= 0, got {per_category}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.per_category = per_category
        self.convention = convention
        self.out_dir = out_dir
        self.written: list[Path] = []

    def _out_dir(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        base = getattr(pl_module, "hparams", {}).get("eval_out_dir") or trainer.default_root_dir
        return Path(base) / "eval" / "viz"

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluator = getattr(pl_module, "evaluator", None)
        dataset = getattr(trainer.datamodule, "test_dataset", None) if trainer.datamodule else None
        if self.per_category == 0 or evaluator is None or dataset is None or not trainer.is_global_zero:
            return
        embedder_fn: Any = getattr(pl_module, "_embedder", None)  # Stage2Alignment's cached embedder
        if embedder_fn is None:
            raise RuntimeError(f"{type(pl_module).__name__} has no eval text embedder: cannot draw pictures")
        from patchalign.eval.evaluator import render_best_worst

        report = evaluator.compute()
        out = self._out_dir(trainer, pl_module)
        encoder = pl_module.encoder
        was_training = encoder.training
        encoder.eval()  # Lightning may already have restored train mode after the loop
        try:
            self.written = render_best_worst(
                report,
                dataset,
                encoder,
                embedder_fn(),
                out,
                self.per_category,
                self.convention,
                assign=pl_module.hparams.get("eval_assign", "nearest"),
                device=pl_module.device,
            )
        finally:
            encoder.train(was_training)
        print(f"best/worst pictures: {len(self.written)} files in {out}")
