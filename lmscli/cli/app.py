"""The ``lms`` command: the root app and the one place where errors become exit codes."""

from __future__ import annotations

import contextlib
import os
import sys

import typer

import lmscli
from lmscli.cli import act, chat, connect, console, link, models, server
from lmscli.cli import log as log_cli
from lmscli.errors import ExitCode, LMSError

HELP = "lmscli: local LLMs from your terminal. Chat, serve and manage GGUF models with llama.cpp."
EPILOG = "Learn more: README.md of lmscli · Docs of the API: http://127.0.0.1:1234/v1"

app = typer.Typer(name="lms", help=HELP, epilog=EPILOG, add_completion=True,
                  no_args_is_help=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(server.app, name="server", rich_help_panel="Serve")
app.add_typer(log_cli.app, name="log", rich_help_panel="Serve")
app.add_typer(link.app, name="link", rich_help_panel="Serve")
models.register(app)
app.command(name="chat", rich_help_panel="Local models")(connect.with_connection(chat.chat))
act.register(app)


@app.command(rich_help_panel="Serve")
@connect.with_connection
def status() -> None:
    """Prints the status of the server and the loaded models."""
    models.print_status()


@app.command(hidden=False)
def version(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """Prints the version of the CLI."""
    from lmscli.cli import render

    if json_:
        render.print_json({"version": lmscli.__version__})
    else:
        console.out.print(f"lmscli {lmscli.__version__}", markup=False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv and "_LMS_COMPLETE" not in os.environ:
        console.out.print("lms is lmscli's command line for your models, server and "
                          "inference runtime.", markup=False)
        console.out.print(f"Version: {lmscli.__version__}", markup=False)
        with contextlib.redirect_stdout(sys.stderr):
            run(["--help"])
        sys.exit(ExitCode.ERROR)  # lms shows help on stderr and exits 1 given nothing to do
    sys.exit(run(argv))


def run(argv: list[str]) -> int:
    try:
        # without standalone mode, Click returns a typer.Exit's code instead of raising it
        code = app(args=argv, prog_name="lms", standalone_mode=False)
    except LMSError as exc:
        console.error(exc.message, exc.hint)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.err.print()
        return ExitCode.INTERRUPTED
    except typer.TyperException as exc:  # Click's usage errors, which Typer re-bases here
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        return ExitCode.ERROR  # lms (commander) exits 1 on every usage error
    return code if isinstance(code, int) else ExitCode.OK
