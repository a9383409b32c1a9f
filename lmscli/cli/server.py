"""``lms server start|stop|status``."""

from __future__ import annotations

from typing import Optional

import typer

from lmscli import serverstate
from lmscli.cli import connect, console, render
from lmscli.errors import LMSError

app = typer.Typer(help="Commands for managing the local server", no_args_is_help=True)


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


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
) -> None:
    """Starts the local server"""
    port = port or serverstate.last_port()
    host = bind or serverstate.default_host()
    if cors:
        console.warn("CORS is enabled. This means any website you visit can use the lmscli "
                     "server.")
    if not loopback(host):
        console.warn("Server will accept connections from the network. Only use this if you "
                     "know what you are doing!")
    running = connect.running()
    if running:
        if running.port != port:
            raise LMSError(f"The server is already running on port {running.port}.",
                           hint="Stop it first with: lms server stop")
        console.info(f"The server is already running on port {running.port}.")
        return
    if foreground:
        from lmscli.server.run import serve

        raise typer.Exit(serve(host, port, cors, announce=True))
    from lmscli.client import daemon

    state = daemon.start_server(port, host, cors)
    console.info(f"Success! Server is now running on port {state.port}")


@app.command()
def stop() -> None:
    """Stops the local server"""
    state = connect.running()
    if state is None:
        raise LMSError("The server is not running.")
    from lmscli.client import daemon

    daemon.stop_server(state)
    console.info(f"Stopped the server on port {state.port}.")


@app.command()
def status(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """Displays the status of the local server"""
    state = connect.running()
    if json_:
        data: dict = {"running": state is not None}
        if state is not None:
            data["port"] = state.port
        elif serverstate.config_exists():
            data["port"] = serverstate.last_port()
        render.print_json(data)
        return
    if state:
        console.info(f"The server is running on port {state.port}.")
    else:
        console.info("The server is not running.")
