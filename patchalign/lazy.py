"""Lazy package exports (PEP 562): ``import pkg`` stays cheap, ``pkg.Name`` imports its module on use.

Used by packages whose public names live in heavy submodules (:mod:`patchalign.eval`, :mod:`zerokey`).
Core layer: standard library only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``exports`` maps a public name to the module
    that defines it (a full dotted path); unknown names raise the usual ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
