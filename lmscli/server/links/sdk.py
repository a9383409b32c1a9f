"""Linked models on lmscli's own routes, which the SDK surface and ``lms chat`` use.

A load of a linked model succeeds without loading anything (the engine already holds it);
a prediction goes to the upstream's streamed ``/chat/completions`` (or ``/completions``) and
its OpenAI chunks become the same NDJSON events a local prediction sends: ``started``,
``fragment``, ``toolCallGeneration*``, then ``success`` with stats, or ``error``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmscli.server.body import Body
from lmscli.server.links.forward import (
    Attempt,
    Forwarder,
    LinkedLog,
    end_stream,
    next_hop,
    stream_error,
    until_disconnected,
    upstream_body,
)
from lmscli.server.links.registry import LinkedModel, LinkTarget
from lmscli.server.links.upstream import DONE, SseDecoder, UpstreamReply
from lmscli.server.sdk.events import failure_event, fragment_event
from lmscli.server.state import Cancellable
from lmscli.server.streams import ndjson, ndjson_answer, ndjson_stream


def load_answer(model: LinkedModel) -> Response:
    """What a load of a linked model answers: success, nothing loaded, no time spent."""
    line = {"type": "success", "info": model.info(), "loadTimeSec": 0.0,
            "alreadyLoaded": True}
    return ndjson_answer(line)


def sdk_payload(body: Body, target: LinkTarget) -> dict[str, Any]:
    """The SDK's request as an OpenAI one: streamed, with usage for the stats."""
    payload = upstream_body(body.data, target)
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}
    if isinstance(payload.get("max_tokens"), int) and payload["max_tokens"] < 0:
        del payload["max_tokens"]  # the SDK's "no limit"; OpenAI servers refuse negatives
    return payload


async def predict(request: Request, body: Body, target: LinkTarget, model: LinkedModel,
                  forwarder: Forwarder, predictions: dict[str, Cancellable]) -> Response:
    hops = next_hop(request)
    prediction = await until_disconnected(request, open_prediction(
        forwarder, target, model, sdk_payload(body, target), hops))
    if prediction is None:
        return Response(status_code=499)
    prediction_id = secrets.token_hex(8)
    predictions[prediction_id] = prediction

    async def on_close() -> None:
        predictions.pop(prediction_id, None)
        await prediction.close()

    return ndjson_stream(prediction.lines(prediction_id), on_close)


async def open_prediction(forwarder: Forwarder, target: LinkTarget, model: LinkedModel,
                          payload: dict[str, Any], hops: int = 1) -> LinkedPrediction:
    """The upstream stream for an SDK prediction (a ``prompt`` goes to ``/completions``),
    on the log bus; no replica answering, or a refusal, is an APIError."""
    path = "/completions" if "prompt" in payload else "/chat/completions"
    completion = UpstreamReply()
    attempt, log = await forwarder.open_stream(target, path, payload, completion, hops)
    return LinkedPrediction(attempt, model, completion, log)


class LinkedPrediction:
    """One upstream stream as SDK events; ``cancel()`` ends it between chunks with the
    stop reason ``userStopped``, as a local prediction ends."""

    def __init__(self, attempt: Attempt, model: LinkedModel, completion: UpstreamReply,
                 log: LinkedLog | None) -> None:
        self.attempt = attempt
        self.info = model.info()
        self.completion = completion
        self.log = log
        self._cancelled = asyncio.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    async def close(self) -> None:
        """Close the upstream request (the client left, or the prediction ended)."""
        await end_stream(self.attempt, self.log)

    async def lines(self, prediction_id: str) -> AsyncIterator[bytes]:
        yield ndjson({"type": "started", "predictionId": prediction_id,
                      "modelInfo": self.info})
        async for message in self.messages():
            yield ndjson(message)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """The predict messages (also the SDK websocket channel's): fragments, tool-call
        generation, then success or error. The caller closes the attempt if it stops early."""
        decoder = SseDecoder()
        async for chunk in self._chunks():
            for event in decoder.feed(chunk):
                for out in self._convert(event):
                    yield out
        stopped = self._cancelled.is_set()
        if not stopped:
            self.completion.error = stream_error(self.attempt, self.completion)
        await self.attempt.close()
        for out in self._ending(stopped):
            yield out
        if self.log is not None:
            self.log.end(stopped)

    async def _chunks(self) -> AsyncIterator[bytes]:
        """The upstream's bytes until it ends or ``cancel()`` is called."""
        stopper = asyncio.ensure_future(self._cancelled.wait())
        chunks = self.attempt.chunks()
        try:
            while True:
                step = asyncio.ensure_future(anext(chunks, None))
                await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    return
                chunk = step.result()
                if chunk is None:
                    return
                yield chunk
        finally:
            stopper.cancel()

    def _convert(self, event: Any) -> list[dict[str, Any]]:
        if event == DONE:
            return []
        text, changes = self.completion.feed_chunk(event)
        # an OpenAI chunk carries one token on the engines we know
        out = [fragment_event(text, 1)] if text else []
        for kind, _index, value in changes:
            if kind == "start":
                out.append({"type": "toolCallGenerationStart", "toolCallId": value})
            elif kind == "name":
                out.append({"type": "toolCallGenerationNameReceived", "name": value})
            else:
                out.append({"type": "toolCallGenerationArgumentFragmentGenerated",
                            "content": value})
        return out

    def _ending(self, stopped: bool) -> list[dict[str, Any]]:
        c = self.completion
        if c.error and not stopped:
            return [failure_event(c.error)]
        ends = [] if stopped else [
            {"type": "toolCallGenerationEnd",
             "toolCallRequest": {"type": "function", "id": call.id, "name": call.name,
                                 "arguments": call.parsed_arguments()},
             "rawContent": "".join(call.arguments)}
            for call in c.calls.values()]
        return [*ends, {"type": "success", "stats": c.stats(stopped), "modelInfo": self.info}]

