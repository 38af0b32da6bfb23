"""Command lines on jsonargparse that take the spellings users already type (every command's one copy).

Each command (``export``, ``demo``, ``viz``, ``bench WHAT``, ``shards VERB``, ``zerokey evaluate``,
...) is a typed function or dataclass whose docstrings become the ``--help`` text;
:func:`run_cli` hands a function to :func:`jsonargparse.auto_cli`, so ``--print_config`` and
``--config FILE`` come for free. jsonargparse names options after the parameters (``--n_objects``),
wants a value after a bool (``--no_baseline true``) and a list as one value (``--seeds [0,1]``). The
commands in the README, the Makefile, the Slurm scripts and people's own scripts were written for
the argparse spellings (``--n-objects 51``, ``--no-baseline``, ``--seeds 0 1``), so
:func:`rewrite_argv` rewrites those (from the parameters' types, :func:`option_kinds`) before
jsonargparse parses anything; both spellings work and jsonargparse does all the parsing and checking.
Core layer (standard library only at import): the engine and the tools use it.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

#: Said under every tool's ``--help`` (jsonargparse prints the underscore spelling only).
SPELLING_NOTE = (
    "Options may also be spelled with dashes (--n-objects), a bool option given alone means true "
    "(--no-baseline), and a list option takes its values one by one (--seeds 0 1) or as one "
    "list (--seeds [0,1])."
)


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other unions and plain types unchanged)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def option_kinds(obj: Callable[..., Any] | type) -> dict[str, tuple[str, bool]]:
    """``option -> (kind, list items are strings)`` of a function's parameters or a dataclass's fields;
    kind is ``bool``, ``list`` or ``other``."""
    hints = typing.get_type_hints(obj)
    out: dict[str, tuple[str, bool]] = {}
    for name in inspect.signature(obj).parameters:
        tp = _unwrap_optional(hints.get(name, Any))
        if tp is bool:
            out[name] = ("bool", False)
        elif typing.get_origin(tp) in (list, tuple, Sequence, typing.Sequence):
            (item, *_) = typing.get_args(tp) or (str,)
            item = _unwrap_optional(item)
            literal_str = typing.get_origin(item) is typing.Literal and all(
                isinstance(v, str) for v in typing.get_args(item)
            )
            out[name] = ("list", item is str or literal_str)
        else:
            out[name] = ("other", False)
    return out


def _is_option(token: str) -> bool:
    return token.startswith("--") or (len(token) == 2 and token[0] == "-" and token[1].isalpha())


def jsonargparse_argv(fn: Callable[..., Any], argv: Sequence[str]) -> list[str]:
    """:func:`rewrite_argv` for ``fn``'s own parameters (other options pass through unchanged)."""
    return rewrite_argv(argv, option_kinds(fn))


def rewrite_argv(
    argv: Sequence[str], kinds: dict[str, tuple[str, bool]], rename_unknown: bool = False
) -> list[str]:
    """Rewrite argparse-style options into jsonargparse's spelling.

    ``--foo-bar`` -> ``--foo_bar``; a bool option without ``true``/``false`` after it -> ``--flag=true``;
    a list option followed by several values -> ``--items=[a,b]`` (strings JSON-quoted, so names with
    spaces survive). Options not in ``kinds`` pass through unchanged (jsonargparse then reports them),
    or, with ``rename_unknown`` (a parser with subcommands whose options differ per verb), only get
    their dashes turned into underscores. Positionals, ``--config`` and ``--help`` pass through.
    """
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        key = name.replace("-", "_")
        if key not in kinds:
            out.append(f"--{key}{eq}{value}" if rename_unknown else tok)
            continue
        kind, str_items = kinds[key]
        if eq:
            out.append(f"--{key}={value}")
        elif kind == "bool" and not (i < len(argv) and argv[i].lower() in ("true", "false")):
            out.append(f"--{key}=true")
        elif kind == "list" and i < len(argv) and not argv[i].startswith("["):
            values = []
            while i < len(argv) and not _is_option(argv[i]):
                values.append(argv[i])
                i += 1
            if values == ["null"]:
                out.append(f"--{key}=null")
            else:
                items = [json.dumps(v) for v in values] if str_items else values
                out.append(f"--{key}=[{','.join(items)}]")
        else:
            out.append(f"--{key}")
    return out


def run_cli(
    fn: Callable[..., Any],
    argv: Sequence[str] | None,
    prog: str,
    positional: bool = True,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse ``argv`` (both spellings) into ``fn``'s typed parameters with jsonargparse and call it.

    Args:
        fn: a typed function; its docstring is the ``--help`` description, its ``Args:`` the options'.
        argv: the arguments after the verb (``None``: ``[]``, never ``sys.argv``, which holds the verb).
        prog: the command as users type it, shown in usage lines.
        positional: required parameters are positional arguments (``export CKPT OUT_DIR``).
        errors: exceptions a user's input can cause (a missing file, a broken checkpoint): printed
            as one ``error: ...`` line on stderr with exit status 1, not as a traceback.

    Returns:
        The exit status: ``fn``'s own if it returns an int, else 0; 1 for an ``errors`` exception and
        2 for a bad command line (a misspelled option, a value of the wrong type), each said in one
        line on stderr instead of jsonargparse's usage text.
    """
    from jsonargparse import ArgumentError, auto_cli

    try:
        result = auto_cli(
            fn,
            args=jsonargparse_argv(fn, argv or []),
            as_positional=positional,
            prog=prog,
            epilog=SPELLING_NOTE,
            exit_on_error=False,
        )
    except ArgumentError as e:
        print(f"error: {flat_message(e)} ({prog} --help lists the options)", file=sys.stderr)
        return 2
    except errors as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def cli_main(
    fn: Callable[..., Any], prog: str, errors: tuple[type[BaseException], ...] = ()
) -> Callable[[Sequence[str] | None], int]:
    """A command's ``main(argv) -> exit status``: :func:`run_cli` over ``fn`` under the name ``prog``
    (for the modules whose command line is exactly one typed function, e.g. each benchmark)."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_cli(fn, argv, prog=prog, errors=errors)

    main.__doc__ = f"``{prog} [options]``: the command line of :func:`{fn.__module__}.{fn.__name__}`."
    return main


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (a ``KeyError``'s without the repr quotes)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return msg.splitlines()[0] if msg.strip() else type(e).__name__


def flat_message(error: BaseException) -> str:
    """An error's whole message on one line (jsonargparse spreads parser errors over several)."""
    return " ".join(str(error).split())


def parse_one_line(parser: Any, argv: Sequence[str] | None, prog: str) -> Any | None:
    """``parser.parse_args(argv)`` for a hand-built jsonargparse parser (positional lists, flags), with
    :func:`run_cli`'s error rule: a bad command line is one line on stderr and ``None`` (exit 2)."""
    from jsonargparse import ArgumentError

    parser.exit_on_error = False
    try:
        return parser.parse_args(list(argv) if argv is not None else None)
    except ArgumentError as e:
        print(f"error: {flat_message(e)} ({prog} --help lists the options)", file=sys.stderr)
        return None
