"""Getting a client for commands that need the server, starting it as lms wakes its daemon,
or reaching another machine's server with ``--host`` / ``--port``.

httpx is imported only once a server is known to run (or must be started): ``lms ps`` with
no server and ``lms --help`` stay fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import typer

from lmscli import serverstate
from lmscli.cli import console
from lmscli.errors import ServerNotRunningError, UserInputError

if TYPE_CHECKING:
    from lmscli.client import Client

GREETING_TIMEOUT_S = 0.5  # as lms waits for a remote server's greeting
PANEL = "Connection"


@dataclass(frozen=True)
class Target:
    """Where the command's server is: the local one (found or started), or ``host:port``."""

    host: str | None = None
    port: int | None = None
    api_key: str | None = None

    @property
    def remote(self) -> bool:
        return self.host is not None or self.port is not None

    @property
    def address(self) -> str:
        return f"{self.host or '127.0.0.1'}:{self.port or serverstate.DEFAULT_PORT}"


_target = Target()


def target() -> Target:
    return _target


def use(host: str | None, port: int | None, api_key: str | None) -> None:
    """Point this command at ``host``/``port`` (lms's rules: no scheme, no port in the host)."""
    global _target
    if host is not None:
        if "://" in host:
            raise UserInputError("Host should not include the protocol.")
        if ":" in host:
            raise UserInputError("Host should not include the port number. "
                                 "Use --port instead.")
        host = host or None
    _target = Target(host, port, api_key or None)


def with_connection(command: Callable[..., Any], *, key_flag: str = "--api-key"
                    ) -> Callable[..., Any]:
    """Adds ``--host``, ``--port`` and ``--api-key`` (defaults from LMS_HOST, LMS_PORT and
    LMS_API_KEY) to a command, and points the command at them before it runs. A command
    whose own ``--api-key`` means another key names the server's ``key_flag``."""
    extra = {
        "host": typer.Option(None, "--host", envvar="LMS_HOST", rich_help_panel=PANEL,
                             help="The host of a remote server (no scheme, no port)."),
        "port": typer.Option(None, "--port", envvar="LMS_PORT", min=1, max=65535,
                             rich_help_panel=PANEL,
                             help=f"The server's port (default {serverstate.DEFAULT_PORT} "
                             "with --host)."),
        "api_key": typer.Option(None, key_flag, envvar="LMS_API_KEY", show_envvar=True,
                                rich_help_panel=PANEL, show_default=False,
                                help="The server's API key, sent as a bearer token."),
    }
    annotations = {"host": Optional[str], "port": Optional[int],  # noqa: UP045 - Typer, 3.10
                   "api_key": Optional[str]}  # noqa: UP045
    signature = inspect.signature(command)
    params = list(signature.parameters.values()) + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                          annotation=annotations[name]) for name, default in extra.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, host: str | None = None, port: int | None = None,
                api_key: str | None = None, **kwargs: Any) -> Any:
        use(host, port, api_key)
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def running() -> serverstate.ServerState | None:
    """The local server's state, if it runs (the remote target's isn't known here)."""
    if serverstate.read_state() is None:
        return None
    from lmscli import daemon

    return daemon.running_server()


def server_port() -> int | None:
    """The target server's port if it answers, else None."""
    if _target.remote:
        return (_target.port or serverstate.DEFAULT_PORT) if reachable() else None
    state = running()
    return state.port if state else None


def reachable() -> bool:
    """Whether the target's server answers: the greeting for a remote one, the state file
    and process for the local one."""
    if not _target.remote:
        return running() is not None
    import httpx

    try:
        response = httpx.get(f"http://{_target.address}/lmstudio-greeting",
                             timeout=GREETING_TIMEOUT_S)
        return response.status_code == 200 and response.json().get("lmstudio") is True
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def client(start: bool = True) -> Client | None:
    """A client for the target's server; the local one is started when ``start``, else None
    if none runs. A remote server that does not answer is an error."""
    from_local = not _target.remote
    if from_local and running() is None:
        if not start:
            return None
        from lmscli import daemon

        port = serverstate.last_port()
        console.info(f"Starting the lmscli server on port {port}...")
        daemon.start_server(port, serverstate.default_host())
    if not from_local:
        check_remote()
    from lmscli.client import Client

    return Client(None if from_local else _target.address, api_key=_target.api_key)


def check_remote() -> None:
    """lms's greeting check before a remote server is used."""
    if _target.remote and not reachable():
        raise ServerNotRunningError(
            f"The server does not appear to be running at {_target.address}. Please make sure "
            "the server is running and accessible at the specified address.", hint=None)


def base_url() -> str | None:
    """The target server's URL, read afresh each time (the local one may move)."""
    if _target.remote:
        return f"http://{_target.address}"
    state = serverstate.read_state()
    return f"http://{state.client_host}:{state.port}" if state else None

