"""A fan-out of diagnostics events to any number of readers, which never waits for them.

Publishers run on the server's event loop (engine threads hop over with
``publish_threadsafe``) and only append to each reader's bounded buffer: a reader that stops
reading loses events, counted, instead of slowing a prediction down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

Event = dict[str, Any]  # {"timestamp": ms, "data": {...}}, LM Studio's DiagnosticsLogEvent
Message = dict[str, Any]  # what a reader gets: {"type": "log", "log": Event} or "dropped"

DEFAULT_BUFFER = 1000  # events per reader; the events themselves are shared, not copied


def now_ms() -> int:
    return int(time.time() * 1000)


class Subscriber:
    """One reader's buffer. On overflow the newest events are dropped and counted; the count
    reaches the reader as a ``dropped`` message at the place where the gap is."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = max(2, limit)  # room for a gap marker plus the event after it
        # events are dicts; an int is the size of a gap that is already closed
        self._items: deque[Event | int] = deque()
        self._dropped = 0  # the gap still open at the tail
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event) -> None:
        """Called on the loop thread for every published event: O(1), never blocks."""
        room = self._limit - len(self._items)
        if room < (2 if self._dropped else 1):
            self._dropped += 1
        else:
            if self._dropped:
                self._items.append(self._dropped)
                self._dropped = 0
            self._items.append(event)
        self._wake()

    def take(self, max_items: int = 256) -> list[Message]:
        """What is waiting, oldest first; an open gap is reported once the buffer is empty."""
        out: list[Message] = []
        while self._items and len(out) < max_items:
            item = self._items.popleft()
            out.append(_dropped(item) if isinstance(item, int) else {"type": "log", "log": item})
        if not self._items and self._dropped:
            out.append(_dropped(self._dropped))
            self._dropped = 0
        return out

    @property
    def pending(self) -> bool:
        return bool(self._items or self._dropped)

    async def wait(self, timeout_s: float) -> None:
        """Until something is waiting or ``timeout_s`` passed, whichever comes first."""
        if self.pending:
            return
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)


class LogBus:
    """Holds the readers. ``active`` is the cheap check publishers make before they even
    build an event: with nobody listening, logging costs one attribute read."""

    def __init__(self, buffer: int = DEFAULT_BUFFER) -> None:
        self.buffer = buffer  # read when a reader subscribes, so tests can shrink it
        # replaced, never mutated: other threads may read it while the loop changes it
        self._subscribers: tuple[Subscriber, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscriber:
        """Call on the event loop."""
        self._loop = asyncio.get_running_loop()
        subscriber = Subscriber(self._loop, self.buffer)
        self._subscribers = (*self._subscribers, subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    def publish(self, data: dict[str, Any], timestamp_ms: int | None = None) -> None:
        """Call on the event loop. ``data`` is the event's ``data`` object, with its type."""
        subscribers = self._subscribers
        if not subscribers:
            return
        event = {"timestamp": timestamp_ms if timestamp_ms is not None else now_ms(),
                 "data": data}
        for subscriber in subscribers:
            subscriber.offer(event)

    def publish_threadsafe(self, data: dict[str, Any]) -> None:
        """From any thread; the event keeps the time of this call, not of its delivery."""
        loop = self._loop
        if loop is None or not self._subscribers:
            return
        # a loop that already closed (server shutting down) has nobody left to tell
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.publish, data, now_ms())


def _dropped(count: int) -> Message:
    return {"type": "dropped", "count": count}


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
