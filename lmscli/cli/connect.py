"""Getting a client for commands that need the server, starting it as lms wakes its daemon.

httpx is imported only once a server is known to run (or must be started): ``lms ps`` with
no server and ``lms --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmscli import serverstate
from lmscli.cli import console

if TYPE_CHECKING:
    from lmscli.client import Client


def running() -> serverstate.ServerState | None:
    if serverstate.read_state() is None:
        return None
    from lmscli import daemon

    return daemon.running_server()


def client(start: bool = True) -> Client | None:
    """A client for the running server; starts one when ``start``, else None if none runs."""
    if running() is None:
        if not start:
            return None
        from lmscli import daemon

        port = serverstate.last_port()
        console.info(f"Starting the lmscli server on port {port}...")
        daemon.start_server(port, serverstate.default_host())
    from lmscli.client import Client

    return Client()
