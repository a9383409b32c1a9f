"""Forwarding requests for linked models to their engines.

The upstream's bytes go to the client as they arrive (a stream stays chunk by chunk, tools,
usage and finish reasons untouched). Before the first byte reaches the client nothing is
lost by trying elsewhere, so a replica that cannot be reached, or drops the connection before
answering, is skipped; once bytes flow, a failure ends the stream with an error event. A
client that disconnects closes the upstream request, which stops the generation there.

One rule for what an engine answers, on every route, relayed or translated: an error status
is passed on with the engine's message in the caller's API's error body; an answer that is
not the shape asked for (a proxy's HTML page, plain text, a stream to a request for a whole
answer, a whole answer to a streamed one) is a 502 naming the link. So a caller never gets
an engine's raw bytes as a success, nor a stream it did not ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response

from lmscli.logbus import LogBus
from lmscli.logbus.events import prediction_input, prediction_output
from lmscli.server.body import Body
from lmscli.server.errors import APIError, shorten
from lmscli.server.links.registry import Link, Links, LinkTarget, describe, error_text
from lmscli.server.links.upstream import SseDecoder, UpstreamReply
from lmscli.server.streams import ClosingStream, sse, watch_disconnect

CONNECT_TIMEOUT_S = 3.0
# A large model may think for minutes before its first byte; a dead one is noticed on connect.
READ_TIMEOUT_S = 600.0
# Fields only this server understands: an upstream would refuse or misread them.
LOCAL_FIELDS = ("ttl", "get_or_load")
# Linked lmscli servers count the hops a request took: a link that points back at its own
# server (directly or round a ring) would otherwise forward forever.
HOPS_HEADER = "X-Lmscli-Hops"
MAX_HOPS = 4
# What each path answers when whole, in words for messages, and the list its JSON holds.
SHAPES = {"/chat/completions": ("a chat completion", "choices"),
          "/completions": ("a text completion", "choices"),
          "/embeddings": ("embeddings", "data")}
STREAM_TYPE = b"text/event-stream"
# A stream is read up to its first event before the client gets anything (so that junk is
# still a clean 502); past this many bytes without one, it is junk.
MAX_PEEK_BYTES = 1 << 20
SNIPPET_CHARS = 80
AUTH_STATUSES = (401, 403, 407)
# A stream that begins with a comment (a keep-alive) is an event stream; its events follow.
KEEPALIVE = object()

T = TypeVar("T")


def http_client() -> httpx.AsyncClient:
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=CONNECT_TIMEOUT_S)
    # the pool bounds concurrent requests to all links together; a queue of clients beyond
    # it waits here rather than failing
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


@dataclass
class Attempt:
    """An upstream response whose status and first bytes have arrived."""

    link: Link
    response: httpx.Response
    first: bytes
    rest: AsyncIterator[bytes]
    closed: bool = field(default=False)
    failure: str | None = None  # why the answer broke off, if it did

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's bytes. A transport failure after the first (they may have reached
        the client already) ends them, says why in ``failure`` and marks the link down."""
        try:
            if self.first:
                yield self.first
            async for chunk in self.rest:
                yield chunk
        except httpx.TransportError as exc:
            self.failure = (f"The linked engine {self.link.name} failed mid-answer: "
                            f"{describe(exc)}")
            self.link.mark_down(describe(exc))

    async def close(self) -> None:
        """Idempotent; shielded, since it runs while the request is being cancelled."""
        if self.closed:
            return
        self.closed = True
        self.link.in_flight -= 1
        with anyio.CancelScope(shield=True):
            await self.response.aclose()


class Forwarder:
    def __init__(self, links: Links, bus: LogBus | None) -> None:
        self.links = links
        self.bus = bus

    async def open(self, target: LinkTarget, path: str, payload: dict[str, Any], *,
                   whole: bool, hops: int = 1) -> Attempt:
        """Send to the first replica that answers; ``whole`` reads the entire body (a
        non-streamed answer), else only the first bytes. A 502 naming every link's failure
        when none answers."""
        content = json.dumps(payload, ensure_ascii=False).encode()
        errors = []
        for link in self.links.ordered(target.links):
            link.in_flight += 1
            link.last_used = time.monotonic()
            try:
                attempt = await self._try(link, path, content, whole, hops)
            except httpx.TransportError as exc:
                link.in_flight -= 1
                link.mark_down(describe(exc))
                errors.append(f"{link.name}: {describe(exc)}")
            except BaseException:
                link.in_flight -= 1
                raise
            else:
                link.served += 1
                return attempt
        what = "The linked engine" if len(errors) == 1 else "None of the linked engines"
        raise APIError(502, f'{what} for "{target.identifier}" answered: ' + "; ".join(errors),
                       type_="server_error", code="upstream_unavailable")

    async def open_stream(self, target: LinkTarget, path: str, payload: dict[str, Any],
                          completion: UpstreamReply, hops: int = 1
                          ) -> tuple[Attempt, LinkedLog | None]:
        """A streamed request that we read and translate (not passed through), on the log
        bus; no replica answering, or an error answer, is an APIError, and ends the log."""
        log = LinkedLog.begin(self.bus, target, payload, completion)
        attempt = await logged(log, self.open(target, path, payload, whole=False, hops=hops))
        error = bad_answer(attempt, path, stream=True)
        if error is not None:
            await attempt.close()
            if log is not None:
                completion.error = error.message
                log.end(stopped=False)
            raise error
        return attempt, log

    async def _try(self, link: Link, path: str, content: bytes, whole: bool,
                   hops: int) -> Attempt:
        headers = link.headers() | {"Content-Type": "application/json", HOPS_HEADER: str(hops)}
        request = self.links.http.build_request("POST", link.url + path, content=content,
                                                headers=headers)
        response = await self.links.http.send(request, stream=True)
        try:
            rest = response.aiter_raw()
            if whole or response.status_code >= 400:
                first = b"".join([chunk async for chunk in rest])
            else:
                first = await peek(rest)
        except BaseException:
            await response.aclose()
            raise
        return Attempt(link, response, first, rest)

    # -- the OpenAI routes ----------------------------------------------------------------

    async def openai(self, request: Request, body: Body, target: LinkTarget, path: str) -> Response:
        """``path`` (``/chat/completions``, ``/completions``, ``/embeddings``) on the
        upstream, its answer passed through."""
        hops = next_hop(request)
        payload = upstream_body(body.data, target)
        stream = payload.get("stream") is True
        log = LinkedLog.begin(self.bus, target, payload) if path != "/embeddings" else None
        attempt = await logged(log, until_disconnected(request, self.open(
            target, path, payload, whole=not stream, hops=hops)))
        if attempt is None:
            return Response(status_code=499)  # nobody is left to read it
        error = bad_answer(attempt, path, stream)
        if error is not None or not stream:
            await attempt.close()
            if log is not None:
                log.whole(attempt, error)
            if error is not None:
                raise error
            return Response(attempt.first, status_code=attempt.response.status_code,
                            media_type="application/json")
        media_type = attempt.response.headers.get("content-type", "text/event-stream")
        return ClosingStream(self._relay(attempt, log), partial(end_stream, attempt, log),
                             media_type=media_type, headers={"Cache-Control": "no-cache"})

    async def _relay(self, attempt: Attempt, log: LinkedLog | None
                     ) -> AsyncIterator[bytes]:
        tail = b"\n"
        async for chunk in attempt.chunks():
            if log is not None:
                log.feed(chunk)
            tail = chunk[-1:] or tail
            yield chunk
        if attempt.failure is not None:  # bytes already went out: say so in-band
            if log is not None:
                log.completion.error = attempt.failure
            yield (b"" if tail == b"\n" else b"\n\n") + sse_error(attempt.failure)
        await attempt.close()
        if log is not None:
            log.end(stopped=False)


async def end_stream(attempt: Attempt, log: LinkedLog | None) -> None:
    """Close a relayed stream's upstream request; its log, if it has not ended, ends as
    stopped by the client."""
    await attempt.close()
    if log is not None:
        log.end(stopped=True)  # a no-op after a normal end


class LinkedLog:
    """One forwarded prediction on the log bus: the messages as sent (the template is
    applied upstream), then the output with stats. Exists only while somebody listens."""

    def __init__(self, bus: LogBus, target: LinkTarget, completion: UpstreamReply) -> None:
        self.bus = bus
        self.target = target
        self.completion = completion
        self._decoder = SseDecoder()
        self._done = False

    @classmethod
    def begin(cls, bus: LogBus | None, target: LinkTarget, payload: dict[str, Any],
              completion: UpstreamReply | None = None) -> LinkedLog | None:
        if bus is None or not bus.active:
            return None
        if "messages" in payload:
            text = json.dumps(payload["messages"], ensure_ascii=False, indent=2)
        else:
            prompt = payload.get("prompt")
            text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        path = f"{target.links[0].name}/{target.model}" if len(target.links) == 1 \
            else target.model
        bus.publish(prediction_input(target.identifier, path, text))
        return cls(bus, target, completion or UpstreamReply())

    def feed(self, chunk: bytes) -> None:
        for event in self._decoder.feed(chunk):
            self.completion.feed_chunk(event)

    def whole(self, attempt: Attempt, error: APIError | None) -> None:
        if error is not None:
            self.completion.error = error.message
        else:
            self.completion.feed_whole(json.loads(attempt.first))
        self.end(stopped=False)

    def end(self, stopped: bool) -> None:
        if self._done:
            return
        self._done = True
        self.bus.publish(prediction_output(self.target.identifier,
                                           self.completion.output_text(),
                                           self.completion.stats(stopped)))


async def logged(log: LinkedLog | None, opening: Awaitable[T]) -> T:
    """``opening``'s result; if it fails (no replica answered), the log says so too."""
    try:
        return await opening
    except APIError as exc:
        if log is not None:
            log.completion.error = exc.message
            log.end(stopped=False)
        raise


def upstream_body(data: dict[str, Any], target: LinkTarget) -> dict[str, Any]:
    """The request as the upstream gets it: its name for the model, our own fields out."""
    out = {k: v for k, v in data.items() if k not in LOCAL_FIELDS}
    out["model"] = target.model
    return out


def next_hop(request: Request) -> int:
    """The hop count to send on; a 508 when the request has been forwarded too often."""
    raw = request.headers.get(HOPS_HEADER, "0")
    hops = int(raw) if raw.isdigit() and len(raw) < 4 else 0
    if hops >= MAX_HOPS:
        raise APIError(508, f"This request went through {hops} linked servers: a link points "
                       "back at a server it came from. Check the links with: lms link ls",
                       type_="server_error", code="link_loop")
    return hops + 1


async def peek(rest: AsyncIterator[bytes]) -> bytes:
    """A stream's bytes up to the line that says what it is (see ``first_line``), or all of
    them when it ends first, or ``MAX_PEEK_BYTES`` of junk."""
    first = b""
    while first_line(first) is None and len(first) <= MAX_PEEK_BYTES:
        chunk = await anext(rest, None)
        if chunk is None:
            break
        first += chunk
    return first


def first_line(content: bytes) -> bytes | None:
    """The first complete line of an event stream that is neither blank nor an event's name
    or id: a comment or the first ``data:``. None until one has arrived."""
    *lines, _ = content.split(b"\n")
    for raw in lines:
        line = raw.strip()
        if line and not line.startswith((b"event:", b"id:", b"retry:")):
            return line
    return None


def bad_answer(attempt: Attempt, path: str, stream: bool) -> APIError | None:
    """Why the upstream's answer cannot go to the caller as a success (its error status, or
    a body that is not the shape asked for); None when it can."""
    if attempt.response.status_code >= 400:
        return refusal(attempt)
    what, key = SHAPES.get(path, SHAPES["/chat/completions"])
    data = first_event(attempt) if stream else whole_json(attempt.first)
    if data is KEEPALIVE or (isinstance(data, dict) and isinstance(data.get(key), list)):
        return None
    name = attempt.link.name
    data = data if isinstance(data, dict) else whole_json(attempt.first)
    if isinstance(data, dict) and "error" in data:  # an error sent with a success status
        return APIError(502, f"The linked engine {name} failed: "
                        f"{error_text(json.dumps(data).encode(), 'no message')}",
                        type_="server_error", code="upstream_error")
    asked = f"{what} stream" if stream else what
    return APIError(502, f"The linked engine {name} did not answer with {asked}; it sent "
                    f"{sample(attempt)}", type_="server_error", code="upstream_bad_answer")


def whole_json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def first_event(attempt: Attempt) -> Any:
    """The JSON of a stream's first event, ``KEEPALIVE`` if a comment comes first, None if
    it is no event stream."""
    content_type = attempt.response.headers.get("content-type", "").encode("latin-1")
    line = first_line(attempt.first)
    if not content_type.lower().startswith(STREAM_TYPE) or line is None:
        return None
    if line.startswith(b":"):
        return KEEPALIVE
    return whole_json(line[5:]) if line.startswith(b"data:") else None


def sample(attempt: Attempt) -> str:
    """What an engine sent, in a few words: status, type and the beginning of the body."""
    response = attempt.response
    content_type = response.headers.get("content-type", "no content type")
    text = shorten(" ".join(attempt.first.decode("utf-8", "replace").split()), SNIPPET_CHARS)
    return f"HTTP {response.status_code} ({content_type}): " + (f'"{text}"' if text else "nothing")


def refusal(attempt: Attempt) -> APIError:
    """An upstream's error status, passed on with the engine's message (and its Retry-After,
    for a 429 or a 503): a 4xx is still the caller's fault, a 5xx the engine's."""
    response = attempt.response
    status = response.status_code if response.status_code < 600 else 502
    text = error_text(attempt.first, response.reason_phrase)
    happened = "refused the request" if status < 500 else f"failed (HTTP {status})"
    if status in AUTH_STATUSES:  # the link's key, not the caller's: passed on, a client
        status = 502             # would blame its own
        happened = (f"refused this server's key (HTTP {response.status_code}; set the link's "
                    "with lms link add … --api-key)")
    retry = response.headers.get("retry-after")
    return APIError(status, f"The linked engine {attempt.link.name} {happened}: {text}",
                    type_="invalid_request_error" if status < 500 else "server_error",
                    code=error_code(attempt.first) or "upstream_error",
                    headers={"Retry-After": retry} if retry else None)


def error_code(content: bytes) -> str | None:
    """The ``code`` of an OpenAI-shaped error body (clients act on some: ``link_loop``,
    ``context_length_exceeded``)."""
    data = whole_json(content)
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return shorten(code, 64) if isinstance(code, str) and code else None


def stream_error(attempt: Attempt, completion: UpstreamReply) -> str | None:
    """Why a stream that we translate ended badly: the connection broke, the engine sent an
    error event, or it sent no completion chunk at all (junk after a keep-alive)."""
    if attempt.failure or completion.error:
        return attempt.failure or completion.error
    if completion.chunks == 0:
        return (f"The linked engine {attempt.link.name} ended its stream without a "
                "completion chunk.")
    return None


def sse_error(message: str) -> bytes:
    return sse({"error": {"message": message, "type": "server_error",
                          "code": "upstream_failed"}})


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch_disconnect(request, lambda: None))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
