"""The server side of ``lms log stream``: the NDJSON stream route and the request log.

``GET /lmscli/logs/stream`` answers one JSON object per line:

- ``{"type": "subscribed"}`` first, once the reader is attached (nothing before it is sent)
- ``{"type": "log", "log": {"timestamp": ms, "data": {...}}}`` per event
- ``{"type": "dropped", "count": N}`` where N events were lost because the reader was slow
- ``{"type": "keepAlive"}`` after ``KEEPALIVE_S`` of silence, so that dead peers are noticed
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmscli.logbus.bus import LogBus
from lmscli.logbus.events import server_log
from lmscli.server.state import app_state
from lmscli.server.streams import NDJSON_TYPE

STREAM_PATH = "/lmscli/logs/stream"
KEEPALIVE_S = 15.0
# how often an idle stream checks whether the server is stopping: uvicorn waits for open
# responses before it exits, and a log stream would otherwise never end
STOP_POLL_S = 0.5

_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){0,256})"')
_CARRY = 300  # bytes kept between body chunks, so that a key split across two is still found


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _stopping(server: Any) -> bool:
    return bool(server is not None and server.should_exit)


async def stream(request: Request) -> StreamingResponse:
    state = app_state(request)
    bus: LogBus = state.logs
    server = state.uvicorn_server
    return StreamingResponse(_lines(bus, server), media_type=NDJSON_TYPE,
                             headers={"Cache-Control": "no-cache"})


async def _lines(bus: LogBus, server: Any) -> AsyncIterator[bytes]:
    # subscribing inside the generator ties the reader's life to the response's
    subscriber = bus.subscribe()
    try:
        yield _line({"type": "subscribed"})
        last_sent = time.monotonic()
        while not _stopping(server):
            await subscriber.wait(STOP_POLL_S)
            messages = subscriber.take()
            if not messages and time.monotonic() - last_sent < KEEPALIVE_S:
                continue
            # while this write waits for a slow reader, new events pile up in its buffer
            yield b"".join(map(_line, messages)) if messages else _line({"type": "keepAlive"})
            last_sent = time.monotonic()
    finally:
        bus.unsubscribe(subscriber)


class RequestLogMiddleware:
    """One ``server.log`` event per HTTP request, once its response has ended. Costs nothing
    while nobody listens; otherwise a regex over the request body as it streams by."""

    def __init__(self, app: ASGIApp, bus: LogBus) -> None:
        self.app = app
        self.bus = bus

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.bus.active or scope["path"] == STREAM_PATH:
            await self.app(scope, receive, send)
            return
        await _LoggedRequest(self.bus, scope).run(self.app, receive, send)


class _LoggedRequest:
    def __init__(self, bus: LogBus, scope: Scope) -> None:
        self.bus = bus
        self._scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.status = 500  # stays so when the app raises before it answers
        self.model: str | None = None
        self._tail = b""

    async def run(self, app: ASGIApp, receive: Receive, send: Send) -> None:
        async def receive_sniffing() -> Message:
            message = await receive()
            if message["type"] == "http.request" and self.model is None:
                self._sniff(message.get("body", b""))
            return message

        async def send_noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await app(self._scope, receive_sniffing, send_noting)
        finally:
            self._publish(time.perf_counter() - started)

    def _sniff(self, chunk: bytes) -> None:
        buffer = self._tail + chunk
        match = _MODEL.search(buffer)
        if match:
            try:
                model = json.loads(b'"' + match.group(1) + b'"')
            except ValueError:
                model = match.group(1).decode(errors="replace")
            # a lone surrogate ("\ud800") would break every listener's UTF-8 stream
            self.model = model.encode("utf-8", "replace").decode()
        self._tail = buffer[-_CARRY:]

    def _publish(self, seconds: float) -> None:
        took = f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"
        content = f"{self.method} {self.path} {self.status} {took}"
        if self.model:
            content += f" model={self.model}"
        level = "error" if self.status >= 500 else "warn" if self.status >= 400 else "info"
        self.bus.publish(server_log(content, level))
