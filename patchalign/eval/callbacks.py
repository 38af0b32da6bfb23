"""Lightning callback: the best / worst pictures of a ``patchalign test`` benchmark run.

The script path (:func:`~patchalign.eval.evaluator.run_zero_shot_eval` with ``viz_per_category``)
draws the best and worst shapes of each category; this callback gives the CLI path the same
pictures, in ``<default_root_dir>/eval/viz/`` beside the ``results.json`` that
:class:`~patchalign.eval.module.ZeroShotSegmentation` writes, where ``python -m patchalign report``
finds them. It runs after the test loop (``on_test_end``, once the module has computed and saved its
report) and re-runs only the chosen shapes.

Why a callback rather than code in the LightningModule: pictures are an evaluation product, not a
training concern, and a config switches them on or off without touching the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from patchalign.eval.evaluator import render_best_worst
from patchalign.eval.metrics import CONVENTIONS
from patchalign.eval.module import ZeroShotSegmentation

log = logging.getLogger(__name__)


class BestWorstPictures(L.Callback):
    """Render the ``per_category`` best and worst shapes of each category after ``test``.

    Args:
        per_category: shapes per category and side (``0`` switches the callback off).
        convention: the mIoU convention that ranks the shapes (``released``, ``pointbert``, ``find3d``).
        out_dir: where to write; default ``<trainer.default_root_dir>/eval/viz`` (next to the
            results the module writes).
    """

    def __init__(
        self, per_category: int = 1, convention: str = "released", out_dir: str | None = None
    ) -> None:
        if per_category < 0:
            raise ValueError(f"per_category must be >= 0, got {per_category}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.per_category = per_category
        self.convention = convention
        self.out_dir = out_dir
        self.written: list[Path] = []

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, ZeroShotSegmentation):
            raise TypeError(
                "BestWorstPictures draws a benchmark run of ZeroShotSegmentation, "
                f"not {type(pl_module).__name__}"
            )
        evaluator = pl_module.evaluator
        dataset = trainer.datamodule.test_dataset
        if self.per_category == 0 or evaluator is None or not trainer.is_global_zero:
            return
        report = evaluator.compute()
        out = Path(self.out_dir) if self.out_dir else pl_module.results_dir() / "viz"
        encoder = pl_module.encoder
        was_training = encoder.training
        encoder.eval()  # Lightning may already have restored train mode after the loop
        try:
            self.written = render_best_worst(
                report,
                dataset,
                encoder,
                pl_module.embedder(),
                out,
                self.per_category,
                self.convention,
                assign=pl_module.assign,
                device=pl_module.device,
            )
        finally:
            encoder.train(was_training)
        print(f"best/worst pictures: {len(self.written)} files in {out}")
