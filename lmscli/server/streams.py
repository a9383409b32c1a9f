"""What every streamed answer shares: the wire encoders (SSE, NDJSON), how long tokens are
gathered into one chunk, a stream whose ending always runs, and watching for a client that
leaves a whole (non-streamed) answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# Tokens that arrive within this long of the previous chunk share the next one: on a small
# machine a write and a client-side parse per token slow decoding down (see bench/).
STREAM_COALESCE_S = 0.025
SSE_HEADERS = {"Cache-Control": "no-cache"}
NDJSON_TYPE = "application/x-ndjson"
SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it
NDJSON_KEEPALIVE = b"\n"  # a blank line: NDJSON readers skip it


def sse(data: Any) -> bytes:
    """One ``data:`` event (OpenAI's chat and text completion streams)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its ``event:`` line (the Responses, Messages and REST v1
    streams: their SDKs dispatch on it)."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def ndjson(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


class ClosingStream(StreamingResponse):
    """A stream whose ``on_close`` runs whatever happens, even when the client leaves before
    the first chunk is sent (the body generator then never starts, so its own ``finally``
    cannot be relied on to stop a prediction or close an upstream request)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def sse_stream(content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
               ) -> ClosingStream:
    return ClosingStream(content, on_close, media_type="text/event-stream",
                         headers=SSE_HEADERS)


def ndjson_stream(content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
                  ) -> ClosingStream:
    return ClosingStream(content, on_close, media_type=NDJSON_TYPE)


def ndjson_lines(content: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(content, media_type=NDJSON_TYPE)


def ndjson_answer(line: dict[str, Any]) -> StreamingResponse:
    """A stream of one line: what a client that reads progress gets when there is none."""
    return StreamingResponse(iter([ndjson(line)]), media_type=NDJSON_TYPE)


async def watch_disconnect(request: Request, on_disconnect: Callable[[], Any]) -> None:
    """Call ``on_disconnect`` when the client of a whole answer goes away: nobody is left to
    read it. Run as a task beside the work, and cancel it when the work ends."""
    # The body has been read, so the server's next ASGI message is the disconnect; the pause
    # only guards against a receive that would answer at once, again and again.
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)
    on_disconnect()
