"""The ``lms`` command: the root app and the one place where errors become exit codes.

A command's module is imported only when that command runs: ``lms --help`` lists the
commands from the table below, and ``lms ps`` never imports what ``lms chat`` needs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

import lmscli
from lmscli.errors import ExitCode, LMSError

HELP = "lmscli: local LLMs from your terminal. Chat, serve and manage GGUF models with llama.cpp."
EPILOG = "Learn more: README.md of lmscli · Docs of the API: http://127.0.0.1:1234/v1"

# name: (module with a ``register(app)``, help panel, the one-line help --help shows). The
# line must be the command's own; tests/cli/test_startup.py checks that they agree.
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "get": ("lmscli.cli.models", "Local models", "Download a model"),
    "load": ("lmscli.cli.models", "Local models", "Load a model"),
    "unload": ("lmscli.cli.models", "Local models", "Unload a model"),
    "ls": ("lmscli.cli.models", "Local models", "List the models available on disk, and those "
           "of linked engines"),
    "ps": ("lmscli.cli.models", "Local models", "List the models currently loaded in memory"),
    "import": ("lmscli.cli.models", "Local models", "Import a model file into lmscli"),
    "chat": ("lmscli.cli.chat", "Local models", "Start an interactive chat with a model"),
    "act": ("lmscli.cli.act", "Local models", "Run a multi-round tool-calling agent on a task"),
    "mcp": ("lmscli.cli.mcp_cmd", "Local models", "MCP servers whose tools agents may use "
            "(mcp.json)"),
    "launch": ("lmscli.cli.launch", "Local models", "Run a coding agent (Claude Code, Codex, "
               "OpenCode) on a local model"),
    "status": ("lmscli.cli.models", "Serve", "Prints the status of the server and the loaded "
               "models."),
    "server": ("lmscli.cli.server", "Serve", "Commands for managing the local server"),
    "log": ("lmscli.cli.log", "Serve", "Log incoming and outgoing messages"),
    "link": ("lmscli.cli.link", "Serve", "Serve models of other engines (vLLM, llama-server, "
             "another lmscli) through this server"),
}


class LazyGroup(TyperGroup):
    """Lists every command at once, but builds one only when it is resolved to run (or to
    complete its arguments): until then it is a stub that carries its name and help."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        eager = dict(self.commands)  # version: the root help lists its panel last
        self.commands.clear()
        self.commands.update({name: TyperCommand(name, help=summary, rich_help_panel=panel)
                              for name, (_, panel, summary) in LAZY_COMMANDS.items()})
        self.commands.update(eager)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from lmscli.cli.root_help import print_root_help

        print_root_help(self, ctx)  # lighter than Typer's renderer, which imports markdown

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        skip_none_coercion(self, ctx)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] in LAZY_COMMANDS:
            self.load(args[0])
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            skip_none_coercion(command, ctx)
        return name, command, rest

    def load(self, name: str) -> Any:
        """The real command ``name``, built from its module's registration."""
        module = importlib.import_module(LAZY_COMMANDS[name][0])
        sub = typer.Typer()
        module.register(sub)
        # only this one: building a command's parameters is the slow part of starting
        sub.registered_commands = [c for c in sub.registered_commands if c.name == name]
        sub.registered_groups = [g for g in sub.registered_groups if g.name == name]
        self.commands[name] = typer.main.get_group(sub).commands[name]  # the stub's place
        return self.commands[name]


def skip_none_coercion(command: Any, ctx: Any) -> None:
    """Options left out (None) skip Typer's coercion, which imports pydantic: the largest part
    of a command's start. Typer skips it itself only for a bool it already has, so flags
    that default to None (--help, the completion ones) default to False, which means the same
    to them, and an optional single value with no callback keeps its None as it is."""
    params = [*command.params, command.get_help_option(ctx)]
    for param in params:
        if getattr(param, "is_flag", False) and param.default is None:
            param.default = False
        elif param is not None and _none_is_final(param):
            param.process_value = _none_passes(param.process_value)
    for sub in getattr(command, "commands", {}).values():  # a group's commands, e.g. server
        skip_none_coercion(sub, ctx)


def _none_is_final(param: Any) -> bool:
    """Whether None, once Click found no value, can only stay None."""
    return (param.default is None and not param.required and not param.multiple
            and param.nargs == 1 and param.callback is None)


def _none_passes(process_value: Any) -> Any:
    def process(ctx: Any, value: Any) -> Any:
        return None if value is None else process_value(ctx, value)

    return process


app = typer.Typer(name="lms", help=HELP, epilog=EPILOG, add_completion=True, cls=LazyGroup,
                  no_args_is_help=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def root() -> None:
    # a callback keeps the root a group: Typer would make a one-command app that command
    pass


@app.command(hidden=False)
def version(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """Prints the version of the CLI."""
    from lmscli.cli import console, render

    if json_:
        render.print_json({"version": lmscli.__version__})
    else:
        console.out.print(f"lmscli {lmscli.__version__}", markup=False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv and "_LMS_COMPLETE" not in os.environ:
        print("lms is lmscli's command line for your models, server and inference runtime.")
        print(f"Version: {lmscli.__version__}", flush=True)
        with contextlib.redirect_stdout(sys.stderr):
            run(["--help"])
        sys.exit(ExitCode.ERROR)  # lms shows help on stderr and exits 1 given nothing to do
    sys.exit(run(argv))


def run(argv: list[str]) -> int:
    try:
        # without standalone mode, Click returns a typer.Exit's code instead of raising it
        code = app(args=argv, prog_name="lms", standalone_mode=False)
    except LMSError as exc:
        from lmscli.cli import console

        console.error(exc.message, exc.hint)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print(file=sys.stderr)
        return ExitCode.INTERRUPTED
    except typer.TyperException as exc:  # Click's usage errors, which Typer re-bases here
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        return ExitCode.ERROR  # lms (commander) exits 1 on every usage error
    return code if isinstance(code, int) else ExitCode.OK
