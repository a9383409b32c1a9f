"""Running one prediction from an async handler: engine events cross into the event loop.

Only the pipeline (``local.py``) submits predictions; everything here is its insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator

from starlette.requests import Request

from lmscli.engine import (
    Done,
    Event,
    Failed,
    Fragment,
    Prediction,
    PredictionRequest,
    QueueFull,
)
from lmscli.engine.types import QUEUE_FULL
from lmscli.logbus.events import PredictionLog, RecoveredCalls
from lmscli.server.errors import APIError, bad_request
from lmscli.server.models import Loaded
from lmscli.server.streams import watch_disconnect

RETRY_AFTER_S = 1  # a queue slot frees when any prediction ends: usually within seconds


class Running:
    """A submitted prediction whose events can be awaited; cancels itself when dropped.

    Events wait in an inbox; the engine thread wakes the event loop only when a consumer is
    blocked on an empty inbox, so a stream that batches tokens costs no wake-up per token.
    """

    def __init__(self, entry: Loaded, request: PredictionRequest,
                 recovered_calls: RecoveredCalls | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox: deque[Event] = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self.entry = entry
        self._lease = contextlib.ExitStack()
        self._lease.enter_context(entry.lease())
        # before submit: the engine may answer at once (an unloaded model ends it on the spot)
        self._log = PredictionLog.begin(entry.bus, entry.identifier, entry.model.path,
                                        request.prompt, recovered_calls)
        try:
            self.prediction: Prediction = entry.instance.submit(request, self._put)
        except QueueFull as exc:
            self._lease.close()
            raise busy(exc) from exc
        self._first: Event | None = None
        self._closed = False

    # -- crossing threads -------------------------------------------------------------------

    def _put(self, event: Event) -> None:
        """Called on the engine thread."""
        if self._log is not None:
            self._log.record(event)
        with self._lock:
            self._inbox.append(event)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    async def _get(self) -> Event:
        while True:
            with self._lock:
                if self._inbox:
                    return self._inbox.popleft()
                self._waiter = waiter = self._loop.create_future()
            await waiter

    def _take_fragments(self, first: Fragment) -> Fragment:
        """``first`` joined with the fragments already waiting right behind it."""
        texts, tokens = [first.text], first.tokens
        with self._lock:
            while self._inbox and isinstance(nxt := self._inbox[0], Fragment):
                self._inbox.popleft()
                texts.append(nxt.text)
                tokens += nxt.tokens
        return first if len(texts) == 1 else Fragment("".join(texts), tokens)

    # -- consuming --------------------------------------------------------------------------

    async def first(self) -> Event:
        """Wait for the first event; a prompt too long for the context becomes a 400."""
        event = await self._get()
        if isinstance(event, Done) and event.stats.stop_reason == "contextLengthReached" \
                and event.stats.predicted_tokens == 0:
            self.close()
            ctx = self.entry.instance.context_length
            raise APIError(400, f"The prompt is {event.stats.prompt_tokens} tokens long, more "
                           f"than the model's context length of {ctx} tokens. Shorten it or "
                           f"load the model with a larger --context-length.",
                           param="messages", code="context_length_exceeded")
        if isinstance(event, Failed):
            self.close()
            raise failure(event)
        self._first = event
        return event

    async def events(self, coalesce_s: float = 0.0) -> AsyncIterator[Event]:
        """The events in order. With ``coalesce_s``, fragments that arrive within that long
        after one was sent are merged into one, except the first, which goes at once."""
        try:
            if self._first is None:
                await self.first()
            event: Event | None = self._first
            self._first = None
            sent_fragment = False
            while True:
                assert event is not None
                yield event
                if isinstance(event, Done | Failed):
                    return
                if coalesce_s and isinstance(event, Fragment):
                    if sent_fragment:
                        await asyncio.sleep(coalesce_s)
                    sent_fragment = True
                event = await self._get()
                if isinstance(event, Fragment):
                    event = self._take_fragments(event)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.prediction.finished.is_set():
            self.prediction.cancel()
        self._lease.close()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def busy(exc: QueueFull) -> APIError:
    return APIError(503, f"The server is busy: {exc} Try again in a moment.",
                    type_="server_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


async def embed(entry: Loaded, texts: list[str], request: Request | None = None
                ) -> list[list[float]]:
    """One unit vector per text, made between the model's prediction steps (one input a
    step while it predicts); a client that leaves stops the rest. An input the model can't
    take is a 400."""
    with entry.lease():
        try:
            job = entry.instance.submit_embedding(texts)
        except QueueFull as exc:
            raise busy(exc) from exc
        watcher = asyncio.create_task(watch_disconnect(request, job.cancel)) \
            if request is not None else None
        try:
            return await asyncio.to_thread(job.result)
        except ValueError as exc:  # an input longer than the context
            raise bad_request(f"Cannot embed this input: {exc}", "input") from None
        finally:
            job.cancel()  # ends it if this handler was cancelled; nothing once it is done
            if watcher is not None:
                watcher.cancel()


def failure(event: Failed) -> APIError:
    """A failed prediction as an HTTP error: the caller's fault (a grammar llama.cpp
    rejected, a draft model that doesn't fit) is a 400, anything else the server's."""
    if event.code == "grammar":
        return APIError(400, f"The grammar for this request was rejected: {event.message}",
                        param="response_format", code="invalid_grammar")
    if event.code == "draft_model":  # one that can't draft for this model (its vocabulary)
        return APIError(400, f"The draft model cannot be used: {event.message}",
                        param="draft_model", code="invalid_draft_model")
    if event.code == QUEUE_FULL:  # taken, then refused: it counted on a slot with no room
        return busy(QueueFull(event.message))
    return APIError(500, f"Prediction failed: {event.message}", type_="server_error",
                    code="prediction_failed")


async def check_grammar(entry: Loaded, grammar: str | None, param: str) -> None:
    """A 400 for a grammar the engine would reject: sampling with it could crash it."""
    if grammar is None:
        return
    reason = await asyncio.to_thread(entry.instance.check_grammar, grammar)
    if reason is not None:
        raise APIError(400, f"The grammar for this request was rejected: {reason}",
                       param=param, code="invalid_grammar")
