"""Training: the thin LightningModules (:mod:`~patchalign.training.modules`), their optimiser rules
and the LightningCLI (:mod:`~patchalign.training.cli`, ``python -m patchalign fit|validate|test|predict``).

Layer rule (``tests/test_architecture.py``): training imports core and the data layer, never
evaluation or tools.
"""
