"""Reading the server's diagnostics stream (``lms log stream``): httpx and the standard library.

``stream_logs`` follows one connection; ``follow_logs`` outlives the server, waiting for it to
come back (perhaps on another port) after it went away. Both yield the server's messages:
``{"type": "log", "log": {"timestamp": ms, "data": {...}}}`` and ``{"type": "dropped",
"count": N}``, plus ``subscribed``, ``disconnected`` and ``reconnected`` markers.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from lmscli import serverstate
from lmscli.client.transport import auth_headers, error_from_response, transport_errors
from lmscli.errors import (
    ConnectionLostError,
    LMSError,
    ServerError,
    ServerNotRunningError,
    ServerTimeoutError,
)

STREAM_PATH = "/lmscli/logs/stream"  # lmscli.server.logs_http's, which needs Starlette
# the server says something at least every 15 s; silence for longer means a dead connection
READ_TIMEOUT_S = 40.0
POLL_S = 1.0
NOT_RUNNING = "The server is not running. Start it with: lms server start"

Message = dict[str, Any]


def state_base_url() -> str | None:
    """The running server's URL from its state file, read afresh each time."""
    state = serverstate.read_state()
    return f"http://{state.client_host}:{state.port}" if state else None


def stream_logs(base_url: str, *, read_timeout_s: float = READ_TIMEOUT_S,
                http: httpx.Client | None = None,
                api_key: str | None = None) -> Iterator[Message]:
    """The messages of one connection, the first being ``{"type": "subscribed"}``; ends when
    the server closes the stream or the connection breaks. Raises ``ServerNotRunningError``
    when nothing answers at ``base_url``. ``http`` is a client to reuse."""
    with contextlib.ExitStack() as stack:
        if http is None:
            http = stack.enter_context(_client(read_timeout_s, api_key))
        yield from _stream(http, base_url)


def _client(read_timeout_s: float, api_key: str | None = None) -> httpx.Client:
    # the stream carries every user's prompts: a keyed server wants the key here too
    return httpx.Client(headers=auth_headers(api_key),
                        timeout=httpx.Timeout(read_timeout_s, connect=5.0))


def _stream(http: httpx.Client, base_url: str) -> Iterator[Message]:
    try:
        with transport_errors(base_url), http.stream("GET", base_url + STREAM_PATH) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            yield from _messages(response)
    except ServerNotRunningError as exc:
        raise ServerNotRunningError(NOT_RUNNING, hint=None) from exc
    except (ServerTimeoutError, ConnectionLostError):
        return  # the server died or hangs: the caller decides whether to wait for it


def _messages(response: httpx.Response) -> Iterator[Message]:
    for line in response.iter_lines():
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ServerError(f"Not a log stream line: {line[:80]!r}") from exc
        if message.get("type") != "keepAlive":
            yield message


def follow_logs(locate: Callable[[], str | None] = state_base_url, *, poll_s: float = POLL_S,
                read_timeout_s: float = READ_TIMEOUT_S,
                api_key: str | None = None) -> Iterator[Message]:
    """``stream_logs`` that survives the server going away.

    The first connection must succeed (else ``ServerNotRunningError``). After that a lost
    stream yields ``{"type": "disconnected"}``; ``locate`` is asked every ``poll_s`` for
    where the server is now, and the next successful subscription yields
    ``{"type": "reconnected", "baseUrl": ...}`` instead of ``subscribed``."""
    base_url = locate()
    if base_url is None:
        raise ServerNotRunningError(NOT_RUNNING, hint=None)
    # one client for every attempt: a new one per poll would rebuild its TLS context each time
    with _client(read_timeout_s, api_key) as http:
        yield from _follow(http, base_url, locate, poll_s)


def _follow(http: httpx.Client, base_url: str, locate: Callable[[], str | None],
            poll_s: float) -> Iterator[Message]:
    first = True
    while True:
        connected = False
        try:
            for message in stream_logs(base_url, http=http):
                if message.get("type") == "subscribed":
                    connected = True
                    message = {"type": "subscribed" if first else "reconnected",
                               "baseUrl": base_url}
                    first = False
                yield message
        except LMSError:
            if first:
                raise
            # while waiting, whatever answers on an old port (or errors) is not it yet
        if first:
            raise ServerError("The server closed the log stream before it began.")
        if connected:
            yield {"type": "disconnected", "baseUrl": base_url}
        time.sleep(poll_s)
        base_url = locate() or base_url
