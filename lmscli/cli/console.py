"""The two consoles: data to stdout, everything else to stderr. No colour when not a TTY."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.theme import Theme

THEME = Theme({"warn": "yellow", "error": "red", "ok": "green", "dim": "dim", "key": "cyan"})


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    plain = not stream.isatty() or "NO_COLOR" in os.environ
    # rich re-resolves the stream at write time, which keeps CliRunner captures working
    return Console(stderr=stderr, theme=THEME, highlight=False, soft_wrap=True,
                   no_color=plain or None, force_terminal=False if plain else None)


out = _console(stderr=False)
err = _console(stderr=True)


def terminal() -> Console:
    """A console for the chat screen: rich wraps lines itself, so that live redraws know how
    many rows they occupy (with soft wrapping the terminal wraps and redraws leave copies)."""
    return Console(theme=THEME, highlight=False)


def info(message: str) -> None:
    err.print(message, markup=False)


def warn(message: str) -> None:
    err.print(f"[warn]W[/warn] {_escape(message)}")


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[error]Error:[/error] {_escape(message)}")
    if hint:
        err.print(f"       {_escape(hint)}", style="dim")


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
