"""The engine's command-line spellings: what the former argparse CLI accepted, handed to jsonargparse.

The rewriting itself is :func:`patchalign.argv.rewrite_argv` (one copy for every command); this module
says which of the engine's options are bools and lists: :class:`EngineConfig`'s fields by type, plus
the verbs' own flags. Options of a verb outside the config (``--work``, ``--meshes``) only get their
dashes turned into underscores.
"""

from __future__ import annotations

from patchalign.argv import flat_message, option_kinds, rewrite_argv
from patchalign.engine.config import EngineConfig

__all__ = ["normalize_argv", "one_line"]

#: Options outside EngineConfig that are bools (a flag alone means true).
_EXTRA_BOOLS = ("no_progress", "released_teacher")

one_line = flat_message


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept the spellings of the former argparse CLI: ``--n-points`` (dashes), ``--keep-renders``
    (a bool alone), ``--templates a b`` (list values one by one); jsonargparse parses the result."""
    kinds = option_kinds(EngineConfig) | {name: ("bool", False) for name in _EXTRA_BOOLS}
    return rewrite_argv(argv, kinds, rename_unknown=True)
