"""What the commands that run tools share (``lms act``, ``lms chat --mcp``): asking before a
tool that writes runs, and the MCP servers named with --mcp, started for the run."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from lmscli.cli import act_view

TOOL_ROUNDS = 8  # rounds of tool calls in one chat reply; the last one gets no tools


class McpTools:
    """The MCP servers named with --mcp, started for this run and ended with it."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.servers: list[Any] = []

    def __enter__(self) -> list[Any]:
        if self.names:
            from lmscli.mcpservers import config
            from lmscli.mcpservers.servers import start_all

            self.servers = start_all(config.find(self.names))
        return self.servers

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.close()


class Approval:
    """Asks before a tool that writes runs: once, always for this tool, or deny."""

    def __init__(self, yes: bool, json_mode: bool) -> None:
        self.yes = yes
        self.json_mode = json_mode
        self.always: set[str] = set()
        self.view: Any = None

    def guard(self, fn: Callable) -> Callable:
        if not getattr(fn, "lms_writes", False):
            return fn

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.allowed(fn.__name__, kwargs):
                return fn(*args, **kwargs)
            return f"Denied: the user did not allow {fn.__name__} to run."

        return guarded

    def allowed(self, name: str, kwargs: dict[str, Any]) -> bool:
        if self.yes or name in self.always:
            return True
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            return False  # never wait for an answer nobody can give
        if self.view:
            self.view.pause()
        shown = ", ".join(f"{k}={act_view.shorten(repr(v), 60)}" for k, v in kwargs.items())
        answer = typer.prompt(f"Allow {name}({shown})? [y]es once / [a]lways / [n]o",
                              default="n", err=True, show_default=False).strip().lower()
        if answer.startswith("a"):
            self.always.add(name)
        return answer[:1] in ("y", "a")
