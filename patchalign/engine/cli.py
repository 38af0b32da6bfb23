"""The engine's command-line spellings: what the former argparse CLI accepted, handed to jsonargparse.

jsonargparse names options after the fields (``--n_points``), wants a value after a bool
(``--keep_renders true``) and a list as one value (``--templates '[a, b]'``). The commands in the
README, ``slurm/shards_array.sh`` and people's scripts use ``--n-points``, ``--keep-renders`` and
``--templates a b``; :func:`normalize_argv` rewrites those before jsonargparse parses anything.
"""

from __future__ import annotations

import json
import typing

from patchalign.engine.config import EngineConfig

__all__ = ["normalize_argv", "one_line"]

#: Options outside EngineConfig that are bools (a flag alone means true).
_EXTRA_BOOLS = ("no_progress", "released_teacher")


def _option_kinds() -> tuple[set[str], set[str]]:
    """(bool options, list options) of every verb, from EngineConfig's types plus the verbs' own."""
    hints = typing.get_type_hints(EngineConfig)
    bools = {k for k, t in hints.items() if t is bool} | set(_EXTRA_BOOLS)
    lists = {
        k
        for k, t in hints.items()
        if tuple in (typing.get_origin(t), *map(typing.get_origin, typing.get_args(t)))
    }
    return bools, lists


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept the spellings of the former argparse CLI: ``--n-points`` (dashes), ``--keep-renders``
    (a bool alone), ``--templates a b`` (list values one by one); jsonargparse parses the result."""
    bools, lists = _option_kinds()
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            out.append(f"--{name}={value}")
        elif name in bools and not (i < len(argv) and argv[i].lower() in ("true", "false")):
            out.append(f"--{name}=true")
        elif name in lists and i < len(argv) and not argv[i].startswith(("[", "--")) and argv[i] != "null":
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out.append(f"--{name}=[{','.join(map(json.dumps, values))}]")
        else:
            out.append(f"--{name}")
    return out


def one_line(error: BaseException) -> str:
    """A parser error (jsonargparse spreads some over several lines) as one line."""
    return " ".join(str(error).split())
