"""Command lines of ``python -m zerokey evaluate|bench`` and ``python -m zerokey.features.bench``:
jsonargparse over typed functions (their docstrings are the ``--help``; ``--config`` and
``--print_config`` for free).

Two conveniences keep the flags the README has always shown: an option may be written with dashes or
underscores (``--pcd-root`` = ``--pcd_root``), and a list option takes several values in a row as
the shell expands a glob (``--annotations a.json b.json``; a JSON list works too). A bad command line
is one line (``error: ...``) and exit status 2, not the usage text.
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_function_cli", "normalise_argv"]


def _list_options(function: Callable[..., Any]) -> dict[str, bool]:
    """Parameter name -> whether it is a list of strings, for every list-typed parameter."""
    out = {}
    for name, hint in typing.get_type_hints(function).items():
        options = (hint,) if typing.get_origin(hint) is list else typing.get_args(hint)
        for arg in options:
            if typing.get_origin(arg) is list:
                out[name] = typing.get_args(arg) == (str,)
    return out


def normalise_argv(argv: Sequence[str], function: Callable[..., Any]) -> list[str]:
    """Dashed option names to the parameters' underscores; runs of list values to one JSON list."""
    params = set(typing.get_type_hints(function)) - {"return"}
    lists = _list_options(function)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        if name.replace("-", "_") in params:
            name = name.replace("-", "_")
        if name in lists and not eq:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out += [f"--{name}", values[0]]  # already a JSON / YAML list
            elif values:
                listed = json.dumps(values) if lists[name] else "[" + ", ".join(values) + "]"
                out += [f"--{name}", listed]
            else:
                out.append(f"--{name}")
            continue
        out.append(f"--{name}{eq}{value}")
    return out


def run_function_cli(function: Callable[..., Any], argv: Sequence[str] | None, prog: str) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``function``'s typed parameters and call it."""
    from jsonargparse import ArgumentError, auto_cli

    args = normalise_argv(list(sys.argv[1:] if argv is None else argv), function)
    try:
        return auto_cli(function, args=args, as_positional=False, prog=prog, exit_on_error=False)
    except ArgumentError as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{prog}: error: {message} (--help lists the options)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
