"""A turn's input and output types, shared by every API and by local and linked engines.

Each API translates its request into a ``TurnInput`` (chat messages and OpenAI-shaped tools,
or raw text); the pipeline (``local.py``) or a linked engine (``links/turn.py``) runs it and
the generated text is split into *blocks* (reasoning, text, tool calls) that open, grow and
close in the order of the reply. Each API renders the blocks in its own shape, whole or
streamed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lmscli.engine import (
    DraftModel,
    Failed,
    PredictionRequest,
    PredictionStats,
    PromptProgress,
    SamplingParams,
)
from lmscli.prompting.tools import (
    CallArgs,
    CallEnd,
    CallStart,
    ContentDelta,
    ParseEvent,
)
from lmscli.server.pipeline.tooluse import ToolUse

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# -- the prompt ------------------------------------------------------------------------------

@dataclass
class TurnInput:
    """What an API request asks for, in the chat route's terms."""

    messages: list[dict[str, Any]]  # OpenAI chat shape, content as text
    tools: list[dict[str, Any]] | None = None  # OpenAI chat shape
    tool_choice: str | dict[str, Any] | None = None  # OpenAI chat shape
    schema_grammar: str | None = None  # structured output
    schema_param: str = "response_format"  # where the schema came from, for errors
    prefill: str = ""  # the start of the answer, written by the caller (Anthropic prefill)
    # the same structured output as OpenAI chat's response_format: a linked engine gets the
    # schema itself, since it builds its own grammar
    response_format: dict[str, Any] | None = None
    # raw text to complete instead of messages (text completions, the SDK's complete()):
    # no chat template, no tools, and the reply comes back unsplit
    prompt: str | None = None
    # a forced freeform tool's grammar: GBNF for the JSON-escaped text of its ``input``
    input_grammar: str | None = None


@dataclass
class RequestParams(SamplingParams):
    """A request's sampling and its speculative decoding, which the engine takes beside the
    sampling: one object carries both from every API's parser to the turn."""

    speculative: Literal["off", "ngram"] | None = None  # None: the model's load setting
    draft_model: DraftModel | None = None
    # the most and the fewest tokens a draft has; None: the load's setting
    draft_max: int | None = None
    draft_min: int | None = None


def prediction_request(prompt: str, params: SamplingParams,
                       grammar: str | None) -> PredictionRequest:
    """The engine's request; a ``RequestParams``' speculative decoding goes beside it."""
    if not isinstance(params, RequestParams):
        return PredictionRequest(prompt, params, grammar)
    return PredictionRequest(prompt, params, grammar, speculative=params.speculative,
                             draft_model=params.draft_model, draft_max=params.draft_max,
                             draft_min=params.draft_min)


def chat_response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Responses ``text.format`` or an Anthropic ``output_config.format`` (flat: ``type``,
    ``schema``, ``name``) as chat's ``response_format``; None for plain text."""
    if fmt is None or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": fmt.get("schema")}
    if isinstance(fmt.get("strict"), bool):
        spec["strict"] = fmt["strict"]
    return {"type": "json_schema", "json_schema": spec}


# -- reasoning, text and calls out of generated text -----------------------------------------

@dataclass
class ReasoningDelta:
    text: str


TurnEvent = ReasoningDelta | ParseEvent


class ThinkSplitter:
    """Splits a leading ``<think>…</think>`` block off generated text fed piece by piece.

    Reasoning models open the block themselves, or their template opens it at the end of the
    prompt (then the reply starts inside it). Only a block at the very start counts: a
    ``<think>`` later in an answer is answer text. Whitespace between the block and the
    answer is dropped.
    """

    def __init__(self, inside: bool = False) -> None:
        self._state: Literal["start", "inside", "gap", "answer"] = (
            "inside" if inside else "start")
        self._buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) decided so far; ``final`` flushes what is held back."""
        self._buf += text
        if self._state == "start" and not self._open(final):
            return "", ""
        reasoning = self._reasoning(final) if self._state == "inside" else ""
        if self._state == "gap":
            self._buf = self._buf.lstrip()
            if self._buf:
                self._state = "answer"
        answer = ""
        if self._state == "answer":
            answer, self._buf = self._buf, ""
        return reasoning, answer

    def _open(self, final: bool) -> bool:
        """Decide whether the reply starts with a think block; False while it can't tell."""
        head = self._buf.lstrip()
        if head.startswith(THINK_OPEN):
            self._buf, self._state = head[len(THINK_OPEN):], "inside"
        elif THINK_OPEN.startswith(head) and not final:
            return False
        else:
            self._state = "answer"
        return True

    def _reasoning(self, final: bool) -> str:
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            reasoning, self._buf = self._buf[:end], self._buf[end + len(THINK_CLOSE):]
            self._state = "gap"
            return reasoning
        keep = 0 if final else _partial_suffix(self._buf, THINK_CLOSE)
        reasoning, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return reasoning


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def opens_thinking(prompt: str) -> bool:
    """Whether the template ended the prompt inside a think block (Qwen3, DeepSeek R1)."""
    return prompt.rstrip().endswith(THINK_OPEN)


class TurnParser:
    """Generated text → turn events: the think block, then text and tool calls."""

    def __init__(self, use: ToolUse, prompt: str, call_id_prefix: str = "call_", *,
                 think: bool = True) -> None:
        # without ``think`` (a grammar shapes the whole reply) nothing is reasoning
        self._think = ThinkSplitter(inside=opens_thinking(prompt)) if think else None
        self._tools = use.parser(call_id_prefix)

    def feed(self, text: str, final: bool = False) -> list[TurnEvent]:
        reasoning, answer = self._think.feed(text, final) if self._think else ("", text)
        out: list[TurnEvent] = [ReasoningDelta(reasoning)] if reasoning else []
        if self._tools is None:
            if answer:
                out.append(ContentDelta(answer))
            return out
        out += self._tools.feed(answer)
        if final:
            out += self._tools.finish()
        return out

    @property
    def called(self) -> bool:
        return bool(self._tools and self._tools.calls)


# -- blocks ------------------------------------------------------------------------------------

BlockKind = Literal["reasoning", "text", "call"]


@dataclass
class Block:
    index: int
    kind: BlockKind
    text: str = ""  # the reasoning, the text, or the call's arguments as JSON
    call_id: str = ""
    call_index: int = 0  # a call's place among the reply's calls (OpenAI's tool_calls index)
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""  # a call as the model wrote it
    recovered: bool = False  # a call written loosely (bare JSON, a fence), not in its format
    closed: bool = False


@dataclass
class Opened:
    block: Block


@dataclass
class Grew:
    block: Block
    text: str
    tokens: int = 1  # the tokens that made ``text``, where one fragment made just this


@dataclass
class Closed:
    block: Block


BlockEvent = Opened | Grew | Closed


class Blocks:
    """Turn events as blocks that open, grow and close in the order of the reply: what every
    API renders (chat deltas, the SDK's fragments and tool-call events, Responses' output
    items, Anthropic's content blocks)."""

    def __init__(self) -> None:
        self.all: list[Block] = []
        self._open: Block | None = None

    def feed(self, events: list[TurnEvent]) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        for event in events:
            if isinstance(event, ReasoningDelta | ContentDelta) and not event.text:
                continue  # nothing to show: no block opens for it
            if isinstance(event, ReasoningDelta):
                self._grow(out, "reasoning", event.text)
            elif isinstance(event, ContentDelta):
                self._grow(out, "text", event.text)
            elif isinstance(event, CallStart):
                block = self._start(out, "call")
                block.call_id, block.call_index, block.name = (
                    event.id, event.index, event.name)
            elif isinstance(event, CallArgs):
                self._grow(out, "call", event.text)
            elif isinstance(event, CallEnd) and self._open is not None:
                block = self._open
                block.arguments, block.raw, block.recovered = (
                    event.arguments, event.raw, event.recovered)
                out += self.close()
        return out

    def close(self) -> list[BlockEvent]:
        block, self._open = self._open, None
        if block is None:
            return []
        block.closed = True
        return [Closed(block)]

    def _start(self, out: list[BlockEvent], kind: BlockKind) -> Block:
        out += self.close()
        block = self._open = Block(len(self.all), kind)
        self.all.append(block)
        out.append(Opened(block))
        return block

    def _grow(self, out: list[BlockEvent], kind: BlockKind, text: str) -> None:
        block = self._open
        if block is None or block.kind != kind:
            block = self._start(out, kind)
        block.text += text
        out.append(Grew(block, text))


def assistant_message(blocks: list[Block]) -> dict[str, Any]:
    """The reply as an OpenAI chat message, for a later turn's history (reasoning dropped, as
    chat templates drop it)."""
    calls = [{"id": b.call_id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.arguments)}}
             for b in blocks if b.kind == "call"]
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(b.text for b in blocks if b.kind == "text")}
    if calls:
        message["tool_calls"] = calls
    return message


# -- how a turn ends -------------------------------------------------------------------------

@dataclass
class Finished:
    stats: PredictionStats  # stop_reason "toolCalls" when the reply called a tool


@dataclass
class Failure:
    event: Failed  # the prediction failed after it started

    @property
    def message(self) -> str:
        return self.event.message


@dataclass
class Idle:
    """Nothing could be sent for a while (a tool call is being read): a stream sends what
    its clients skip, so that their read timeouts don't fire."""


# What a turn streams: the prompt's progress (local engines), blocks, then its end.
TurnOutput = PromptProgress | BlockEvent | Idle | Finished | Failure


class AnyTurn(Protocol):
    """What the renderers use of a turn: a local ``Turn``, or a linked engine's."""

    blocks: Blocks
    finished: Finished | None
    prompt_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    def stream(self) -> AsyncIterator[TurnOutput]: ...

    async def whole(self) -> Finished: ...

    async def close(self) -> None: ...
