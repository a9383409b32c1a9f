"""``lms log stream``: what the model was fed and what it produced, as it happens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Optional

import typer

from lmscli.cli import connect, console, render
from lmscli.errors import UserInputError

app = typer.Typer(help="Log incoming and outgoing messages", no_args_is_help=True)

Paint = Callable[[str], str]
INPUT, OUTPUT = "llm.prediction.input", "llm.prediction.output"


class Source(str, Enum):
    model = "model"
    server = "server"
    runtime = "runtime"


@app.command()
@connect.with_connection
def stream(
    json_: bool = typer.Option(False, "--json",
                               help="Outputs in JSON format, separated by newline"),
    stats: bool = typer.Option(False, "--stats", help="Print prediction stats if available"),
    source: Source = typer.Option(Source.model, "-s", "--source",
                                  help="Source of logs: 'model', 'server', or 'runtime'"),
    filter_: Optional[str] = typer.Option(  # noqa: UP045 - Typer needs Optional on 3.10
        None, "--filter", help="Filter for model source: 'input', 'output'"),
) -> None:
    """Stream logs from lmscli"""
    wanted = wanted_types(source.value, filter_, stats)
    from lmscli.client.logs import follow_logs

    show: Callable[[dict[str, Any]], None] = (
        render.print_json if json_ else _text_printer(stats, green_painter()))
    connect.check_remote()
    with _sigterm_as_interrupt():
        try:
            _pump(follow_logs(connect.base_url, api_key=connect.target().api_key), wanted,
                  show)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None  # Ctrl+C is how this command is meant to end
        except BrokenPipeError:
            _silence_stdout()  # `lms log stream | head`: the reader is done, so are we


def wanted_types(source: str, filter_: str | None, stats: bool) -> frozenset[str]:
    """The event types to show, after lms's checks of the options (same order, same text)."""
    if stats and source != "model":
        raise UserInputError("--stats can only be used with --source model")
    if filter_ is not None and source != "model":
        raise UserInputError("--filter can only be used with --source model")
    if source == "server":
        return frozenset({"server.log"})
    if source == "runtime":
        return frozenset({"runtime.log"})
    if filter_ is None:
        return frozenset({INPUT, OUTPUT})
    if not filter_.strip():
        raise UserInputError("--filter cannot be empty")
    kinds = [part.strip() for part in filter_.split(",") if part.strip()]
    if any(kind not in ("input", "output") for kind in kinds):
        raise UserInputError("--filter values must be 'input', 'output', or 'input,output'")
    # "," names nothing: lms then shows both directions
    return frozenset(f"llm.prediction.{kind}" for kind in kinds or ("input", "output"))


def _pump(messages: Iterator[dict[str, Any]], wanted: frozenset[str],
          show: Callable[[dict[str, Any]], None]) -> None:
    for message in messages:
        kind = message.get("type")
        if kind == "log":
            event = message["log"]
            if event.get("data", {}).get("type") in wanted:
                show(event)
        elif kind == "subscribed":
            console.info("Streaming logs from lmscli\n")
        elif kind == "dropped":
            console.warn(f"{message['count']} log events were dropped because this terminal "
                         "was reading too slowly.")
        elif kind == "disconnected":
            console.warn("Lost the connection to the server. Waiting for it to come back "
                         "(Ctrl+C to stop)...")
        elif kind == "reconnected":
            console.info(f"Reconnected to the server at {message['baseUrl']}.")


def _text_printer(stats: bool, paint: Paint) -> Callable[[dict[str, Any]], None]:
    def show(event: dict[str, Any]) -> None:
        out = console.out.file
        out.write(format_event(event, stats=stats, paint=paint))
        out.flush()

    return show


# -- formatting (lms's printFormattedLog) -----------------------------------------------------

def format_event(event: dict[str, Any], *, stats: bool = False, paint: Paint = str) -> str:
    """The text of one event, newlines included, exactly as lms prints it."""
    data = event.get("data", {})
    kind = data.get("type")
    if kind == "server.log":
        return f"{js_string(data.get('content'))}\n"
    if kind == "runtime.log":
        return f"{runtime_line(data)}\n"
    lines = [f"timestamp: {paint(locale_timestamp(event['timestamp']))}",
             f"type: {paint(js_string(kind))}",
             f"modelIdentifier: {paint(js_string(data.get('modelIdentifier')))}"]
    if kind == INPUT:
        lines += [f"modelPath: {paint(js_string(data.get('modelPath')))}", "input:",
                  paint(js_string(data.get("input")))]
    elif kind == OUTPUT:
        lines += ["output:", paint(js_string(data.get("output")))]
        if data.get("recoveredToolCalls"):
            names = ", ".join(map(js_string, data["recoveredToolCalls"]))
            lines.append(f"recoveredToolCalls: {paint(names)} (written as plain JSON, returned "
                         "as tool calls)")
        if stats:
            lines += stats_lines(data.get("stats"), paint)
    return "\n".join(lines) + "\n\n\n"  # the last line's end, then two blank lines


def stats_lines(stats: dict[str, Any] | None, paint: Paint = str) -> list[str]:
    if stats is None:
        return ["No stats available"]
    return [f"{key}: {paint(js_string(value))}" for key, value in stats.items()]


def runtime_line(data: dict[str, Any]) -> str:
    """``[LEVEL] engine@version (type)[ model][ pid=N] message``."""
    line = (f"[{js_string(data.get('level')).upper()}] {js_string(data.get('engineName'))}@"
            f"{js_string(data.get('engineVersion'))} ({js_string(data.get('engineType'))})")
    if "modelIdentifier" in data:
        line += f" {js_string(data['modelIdentifier'])}"
    if "pid" in data:
        line += f" pid={js_string(data['pid'])}"
    return f"{line} {js_string(data.get('message'))}"


def locale_timestamp(ms: float) -> str:
    """``new Date(ms).toLocaleString()`` in en-US, local time: ``11/13/2024, 9:35:15 AM``."""
    t = datetime.fromtimestamp(ms / 1000)
    hour = t.hour % 12 or 12
    half = "AM" if t.hour < 12 else "PM"
    return f"{t.month}/{t.day}/{t.year}, {hour}:{t.minute:02d}:{t.second:02d} {half}"


def js_string(value: Any) -> str:
    """``String(value)`` as JavaScript writes it, for values that came from JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return js_number(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def js_number(x: float) -> str:
    """Numbers as JavaScript prints them: ``2`` not ``2.0``, ``0.00001`` not ``1e-05``."""
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    if 1e-6 <= abs(x) < 1e21:
        return format(Decimal(repr(x)), "f")  # the shortest digits, never in e-notation
    mantissa, _, exponent = repr(x).partition("e")
    return f"{mantissa}e{'-' if exponent.startswith('-') else '+'}{exponent.lstrip('+-0')}"


def green_painter() -> Paint:
    """Values in green when stdout is a colour terminal (the console module decides)."""
    if console.out.color_system is None:
        return str
    from rich.color import ColorSystem
    from rich.style import Style

    green = Style(color="green")
    return lambda text: green.render(text, color_system=ColorSystem.STANDARD)


# -- process plumbing -------------------------------------------------------------------------

@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill`` ends the stream as Ctrl+C does: exit 0, as lms does on SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (CLI tests may run elsewhere)
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    # Python would complain about the broken pipe again when it flushes stdout at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="log", rich_help_panel="Serve")
