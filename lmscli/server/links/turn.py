"""An agent API turn (``/v1/responses``, ``/v1/messages``, ``/api/v1/chat``) on a linked engine.

Upstreams speak OpenAI chat, rarely the Responses or Messages APIs, so the turn is translated:
the ``TurnInput`` becomes a streamed ``/chat/completions`` request sent through the Forwarder
(replicas, failover, hop count, log bus), and the chat chunks become the block events a local
turn emits (reasoning, text, tool calls, then ``Finished`` or ``Failure``). Each API's renderer
then works unchanged, whole or streamed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from lmscli.engine import Failed, PredictionStats, SamplingParams
from lmscli.prompting.tools import CallArgs, CallEnd, CallStart, ContentDelta
from lmscli.server.errors import APIError
from lmscli.server.links.forward import (
    Attempt,
    Forwarder,
    LinkedLog,
    next_hop,
    stream_error,
    until_disconnected,
)
from lmscli.server.links.registry import LinkTarget
from lmscli.server.links.upstream import DONE, SseDecoder, UpstreamReply
from lmscli.server.pipeline.turns import (
    BlockEvent,
    Blocks,
    Failure,
    Finished,
    ReasoningDelta,
    RequestParams,
    ThinkSplitter,
    TurnEvent,
    TurnInput,
)

# OpenAI's sampling fields, and those llama.cpp-family servers (llama-server, vLLM, another
# lmscli) read too; only values the caller changed are sent, so the upstream's defaults hold.
SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                   "min_p", "repeat_penalty")
DEFAULTS = SamplingParams()


def chat_payload(target: LinkTarget, wanted: TurnInput, params: SamplingParams) -> dict[str, Any]:
    """The turn as a streamed OpenAI chat request, with usage for the stats."""
    messages = list(wanted.messages)
    if wanted.prefill:  # the nearest chat has to a prefill: the answer's start, as history
        messages.append({"role": "assistant", "content": wanted.prefill})
    payload: dict[str, Any] = {"model": target.model, "messages": messages, "stream": True,
                               "stream_options": {"include_usage": True}}
    if wanted.tools:
        payload["tools"] = wanted.tools
        if wanted.tool_choice is not None:
            payload["tool_choice"] = wanted.tool_choice
    if wanted.response_format is not None:
        payload["response_format"] = wanted.response_format
    for key in SAMPLING_FIELDS:
        if getattr(params, key) != getattr(DEFAULTS, key):
            payload[key] = getattr(params, key)
    if params.seed is not None:
        payload["seed"] = params.seed
    if params.max_tokens is not None:
        payload["max_tokens"] = params.max_tokens
    if params.stop:
        payload["stop"] = params.stop
    return payload | drafting_fields(params)


def drafting_fields(params: SamplingParams) -> dict[str, Any]:
    """The speculative decoding the caller asked for, in lmscli's request fields, as a
    relayed body carries them: an upstream lmscli honours them (finding the draft model by
    its key among its own models), other engines ignore fields they don't know."""
    if not isinstance(params, RequestParams):
        return {}
    draft = params.draft_model.model_key if params.draft_model is not None else None
    fields = {"speculative": params.speculative, "draft_model": draft,
              "draft_max_tokens": params.draft_max, "draft_min_tokens": params.draft_min}
    return {key: value for key, value in fields.items() if value is not None}


class LinkedTurn:
    """One upstream chat stream as a turn's block events (see ``turns.AnyTurn``)."""

    def __init__(self, request: Request, forwarder: Forwarder, target: LinkTarget,
                 payload: dict[str, Any], call_id_prefix: str = "call_") -> None:
        self.request, self.forwarder, self.target = request, forwarder, target
        self.payload = payload
        self.blocks = Blocks()
        self.finished: Finished | None = None
        self.prompt_tokens = 0  # an upstream tells them with the last chunk only
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.completion = UpstreamReply()
        self.log: LinkedLog | None = None
        self._attempt: Attempt | None = None
        self._prefix = call_id_prefix
        # a schema shapes the whole reply: nothing in it is reasoning (as for a local turn)
        self._think = ThinkSplitter() if "response_format" not in payload else None
        self._call: int | None = None  # the index of the tool call being received
        self._named: set[int] = set()

    async def start(self) -> None:
        """Open the upstream stream; no replica answering, or a refusal, is an HTTP error."""
        opened = await until_disconnected(self.request, self.forwarder.open_stream(
            self.target, "/chat/completions", self.payload, self.completion,
            next_hop(self.request)))
        if opened is None:
            raise APIError(499, "The client disconnected.", code="client_disconnected")
        self._attempt, self.log = opened

    async def stream(self) -> AsyncIterator[BlockEvent | Finished | Failure]:
        assert self._attempt is not None
        decoder = SseDecoder()
        try:
            async for chunk in self._attempt.chunks():
                for event in decoder.feed(chunk):
                    for block_event in self.blocks.feed(self._convert(event)):
                        yield block_event
        except BaseException:
            # the client left (the stream was cancelled or closed): closing the upstream
            # request stops the generation there
            await self.close()
            raise
        # bytes may have gone out already: a failure ends the turn with a Failure event
        self.completion.error = stream_error(self._attempt, self.completion)
        await self._attempt.close()
        for event in self._ending():
            yield event

    async def whole(self) -> Finished:
        """Run to the end; a client that disconnects meanwhile closes the upstream stream."""
        finished = await until_disconnected(self.request, self._drain())
        if finished is None:
            raise APIError(499, "The client disconnected.", code="client_disconnected")
        return finished

    async def _drain(self) -> Finished:
        async with contextlib.aclosing(self.stream()) as events:
            async for event in events:
                if isinstance(event, Failure):
                    raise APIError(502, event.message, type_="server_error",
                                   code="upstream_failed")
                if isinstance(event, Finished):
                    return event
        raise AssertionError("a linked turn ends with Finished or Failure")

    async def close(self) -> None:
        """Close the upstream request (the client left, or the turn ended); idempotent."""
        if self._attempt is not None:
            await self._attempt.close()
        self._end_log(None, stopped=self.finished is None and not self.completion.error)

    # -- chat chunks → turn events ------------------------------------------------------------

    def _convert(self, event: Any) -> list[TurnEvent]:
        if event == DONE or not isinstance(event, dict):
            return []
        out: list[TurnEvent] = []
        reasoning = reasoning_of(event)
        text, changes = self.completion.feed_chunk(event)
        if reasoning:
            self._end_call(out)
            self.reasoning_tokens += 1  # one chunk, one token on the engines we know
            out.append(ReasoningDelta(reasoning))
        if text:
            self._text(out, text)
        for kind, index, value in changes:
            self._call_change(out, kind, index, value)
        return out

    def _text(self, out: list[TurnEvent], text: str, final: bool = False) -> None:
        thought, answer = self._think.feed(text, final) if self._think else ("", text)
        if thought or answer:
            self._end_call(out)
        if thought:
            self.reasoning_tokens += 1
            out.append(ReasoningDelta(thought))
        if answer:
            out.append(ContentDelta(answer))

    def _call_change(self, out: list[TurnEvent], kind: str, index: int, value: str) -> None:
        # servers send a call's id and name first, then its arguments; a call is announced
        # once its name is known (or its arguments begin without one)
        if kind == "start":
            self._end_call(out)
            self._call = index
            return
        if index not in self._named:
            self._named.add(index)
            call = self.completion.calls[index]
            out.append(CallStart(index, self._call_id(call.id), call.name))
        if kind == "args":
            out.append(CallArgs(index, value))

    def _call_id(self, upstream_id: str) -> str:
        # Anthropic's SDK expects toolu_ ids; the upstream's own id stays recognisable
        return upstream_id if upstream_id.startswith(self._prefix) \
            else self._prefix + upstream_id

    def _end_call(self, out: list[TurnEvent]) -> None:
        index, self._call = self._call, None
        if index is None:
            return
        call = self.completion.calls[index]
        if index not in self._named:
            self._named.add(index)
            out.append(CallStart(index, self._call_id(call.id), call.name))
        arguments = call.parsed_arguments()
        out.append(CallEnd(index, self._call_id(call.id), call.name,
                           arguments if isinstance(arguments, dict) else {},
                           "".join(call.arguments)))

    def _ending(self) -> list[BlockEvent | Finished | Failure]:
        if self.completion.error:
            self._end_log(self.completion.error)
            return [*self.blocks.close(), Failure(Failed(self.completion.error))]
        held: list[TurnEvent] = []
        if self._think is not None:
            self._text(held, "", final=True)
        self._end_call(held)
        closing = self.blocks.feed(held) + self.blocks.close()
        self.finished = Finished(self._stats())
        self._end_log(None)
        return [*closing, self.finished]

    def _stats(self) -> PredictionStats:
        lms = self.completion.stats()
        self.prompt_tokens = lms.get("promptTokensCount", 0)
        self.cached_tokens = lms.get("cachedPromptTokensCount", 0)
        usage = self.completion.usage or {}
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
            self.reasoning_tokens = details["reasoning_tokens"]
        return PredictionStats(
            lms["stopReason"], self.prompt_tokens, self.cached_tokens,
            lms["predictedTokensCount"], lms.get("timeToFirstTokenSec"),
            lms.get("tokensPerSecond"), lms["totalTimeSec"])

    def _end_log(self, error: str | None, stopped: bool = False) -> None:
        if self.log is None:
            return
        if error is not None:
            self.completion.error = error
        self.log.end(stopped)


def reasoning_of(event: dict[str, Any]) -> str:
    """A chunk's reasoning text: ``reasoning_content`` (llama-server, DeepSeek, vLLM) or
    ``reasoning`` (Ollama, newer vLLM)."""
    choices = event.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        return ""
    text = delta.get("reasoning_content") or delta.get("reasoning")
    return text if isinstance(text, str) else ""
