"""Keypoints from PatchAlign3D's dense features (zero-shot from text, few-shot from prototypes), run
through ZeroKey's prediction loop, writer and evaluation.

:mod:`~zerokey.features.keypoints` holds the rules in plain torch; :mod:`~zerokey.features.pipeline`
the detectors; :mod:`~zerokey.features.bench` their benchmark.
"""
