"""``lms server start|stop|status``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmscli import serverstate
from lmscli.cli import connect, console, render
from lmscli.errors import LMSError, UserInputError
from lmscli.server.security import DEFAULT_MAX_BODY_MB, bind_refusal, is_loopback

app = typer.Typer(help="Commands for managing the local server", no_args_is_help=True)


@app.command()
def start(
    port: Optional[int] = typer.Option(  # noqa: UP045 - Typer needs Optional on 3.10
        None, "-p", "--port", min=1, max=65535,
        help="Port to run the server on. If not provided, the server will run on the same "
             "port as the last time it was started."),
    bind: Optional[str] = typer.Option(  # noqa: UP045
        None, "--bind", help='Network address to bind the server to. Use "0.0.0.0" to accept '
        'connections from the local network, or "127.0.0.1" (default) for localhost only. '
        "Can also be set via the LMS_SERVER_HOST environment variable."),
    cors: bool = typer.Option(False, "--cors", help="Enable CORS on the server. Allows any "
                              "website you visit to access the server."),
    foreground: bool = typer.Option(False, "--foreground", help="Run in this process until "
                                    "Ctrl+C (for containers and service managers)."),
    api_key: Optional[str] = typer.Option(  # noqa: UP045
        None, "--api-key", help="Require this key ('Authorization: Bearer KEY') on every "
        "request but the greeting. Defaults to the LMS_API_KEY (or LM_API_TOKEN) environment "
        "variable, which clients and lms commands send."),
    allow_unauthenticated: bool = typer.Option(
        False, "--allow-unauthenticated", help="Allow a network --bind without an API key: "
        "anyone who can reach the port can use the server."),
    allow_local_mcp: bool = typer.Option(
        False, "--allow-local-mcp", help="Let /api/v1/chat's ephemeral MCP servers be at "
        "loopback or private addresses (refused by default: a request must not reach into "
        "this machine's network)."),
    allowed_hosts: Optional[list[str]] = typer.Option(  # noqa: UP045
        None, "--allowed-host", help="Also accept requests whose Host header names this host "
        "(repeatable; * for any). Also LMS_ALLOWED_HOSTS, comma-separated."),
    max_body_mb: float = typer.Option(
        DEFAULT_MAX_BODY_MB, "--max-body-mb", min=0.001,
        help="Refuse request bodies larger than this many megabytes (413)."),
    parallel: int = typer.Option(
        4, "--parallel", min=1, max=64, help="Predictions each model runs at once, for loads "
        "that don't set --parallel themselves (JIT loads included)."),
    max_queue: int = typer.Option(
        64, "--max-queue", min=0, max=100_000, help="Requests that may wait for a model's "
        "free slot; past that the server answers 503 with Retry-After."),
    cache_ram: Optional[str] = typer.Option(  # noqa: UP045
        None, "--cache-ram", metavar="SIZE", help="Host memory for saved prompt caches, so "
        "that a conversation that lost its slot does not process its prompt again (e.g. 2G; "
        "0 turns it off). Default: an eighth of the machine's memory, at most 8G."),
    cache_dir: Optional[str] = typer.Option(  # noqa: UP045
        None, "--cache-dir", metavar="DIR", help="Where saved prompt caches are also kept, "
        "across restarts. Default: prompt-cache in lmscli's data folder."),
    cache_disk: Optional[str] = typer.Option(  # noqa: UP045
        None, "--cache-disk", metavar="SIZE", help="Disk space for saved prompt caches "
        "(default 4G; 0 keeps them in memory only)."),
) -> None:
    """Starts the local server"""
    port = port or serverstate.last_port()
    host = bind or serverstate.default_host()
    api_key = api_key or serverstate.env_api_key()
    _check_bind(host, api_key, allow_unauthenticated)
    if cors:
        console.warn("CORS is enabled. This means any website you visit can use the lmscli "
                     "server.")
    if not is_loopback(host):
        console.warn("Server will accept connections from the network. Only use this if you "
                     "know what you are doing!")
    running = connect.running()
    if running:
        if running.port != port:
            raise LMSError(f"The server is already running on port {running.port}.",
                           hint="Stop it first with: lms server stop")
        console.info(f"The server is already running on port {running.port}.")
        return
    options: dict[str, Any] = {"api_key": api_key, "allowed_hosts": allowed_hosts or [],
               "max_body_mb": max_body_mb, "allow_unauthenticated": allow_unauthenticated,
               "parallel": parallel, "max_queue": max_queue, "allow_local_mcp": allow_local_mcp,
               **_cache_options(cache_ram, cache_dir, cache_disk)}
    if foreground:
        from lmscli.server.run import serve

        raise typer.Exit(serve(host, port, cors, announce=True, **options))
    from lmscli import daemon

    state = daemon.start_server(port, host, cors, **options)
    console.info(f"Success! Server is now running on port {state.port}")


def _cache_options(ram: str | None, folder: str | None, disk: str | None) -> dict[str, Any]:
    """The prompt cache's options, checked here so that a bad size is one line, not a server
    that fails to start."""
    from lmscli.engine.promptcache import parse_size

    def size(flag: str, value: str | None) -> int | None:
        try:
            return None if value is None else parse_size(value)
        except ValueError as exc:
            raise UserInputError(f"option '{flag}': {exc}") from None

    return {"cache_ram": size("--cache-ram", ram), "cache_disk": size("--cache-disk", disk),
            "cache_dir": str(Path(folder).expanduser().resolve()) if folder else None}


def _check_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    refusal = bind_refusal(host, api_key, allow_unauthenticated)
    if refusal:
        raise UserInputError(refusal)


@app.command()
def stop() -> None:
    """Stops the local server"""
    from lmscli import daemon

    # the state file's pid must still be this home's server: never signal a stranger
    state = daemon.verified_server()
    if state is None:
        raise LMSError("The server is not running.")
    daemon.stop_server(state)
    console.info(f"Stopped the server on port {state.port}.")


@app.command()
@connect.with_connection
def status(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """Displays the status of the local server"""
    port = connect.server_port()
    if json_:
        data: dict = {"running": port is not None}
        if port is not None:
            data["port"] = port
        elif serverstate.config_exists():
            data["port"] = serverstate.last_port()
        render.print_json(data)
        return
    if port is not None:
        console.info(f"The server is running on port {port}.")
    else:
        console.info("The server is not running.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="server", rich_help_panel="Serve")
