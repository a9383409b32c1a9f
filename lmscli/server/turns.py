"""One assistant turn for the agent APIs (``/v1/responses``, ``/v1/messages``).

Each API translates its request into chat messages and OpenAI-shaped tools; from there a turn
takes the chat route's path (tool use, chat template, grammar, engine, log bus), and splits the
generated text into *blocks* (reasoning, text, tool calls) that open, grow and close in the
order of the reply. Each API renders the blocks in its own shape, whole or streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from starlette.requests import Request

from lmscli.engine import (
    Done,
    Failed,
    Fragment,
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
from lmscli.server.errors import Body, bad_request
from lmscli.server.models import Loaded
from lmscli.server.openai_api import STREAM_COALESCE_S
from lmscli.server.parsing import model_for
from lmscli.server.predict import Running, _cancel_on_disconnect, check_grammar, failure
from lmscli.server.streams import ClosingStream
from lmscli.server.tooluse import MAX_TOOL_NAME_CHARS, ToolUse, chat_prompt, tool_use

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


@dataclass
class Prepared:
    entry: Loaded
    prompt: str
    use: ToolUse
    grammar: str | None
    grammar_param: str


def check_tool_name(tool: Body, key: str = "name") -> str:
    name = tool.get(key, str, required=True)
    if not name or len(name) > MAX_TOOL_NAME_CHARS or not name.isprintable():
        where = f"{tool.prefix}.{key}"
        raise bad_request(f"'{where}' must be 1 to {MAX_TOOL_NAME_CHARS} printable characters.",
                          where)
    return name


async def prepare(entry: Loaded, turn: TurnInput) -> Prepared:
    """Tool use, the exact prompt and the one grammar (a forced call or a schema)."""
    use = tool_use(Body({"tools": turn.tools, "tool_choice": turn.tool_choice}), entry)
    if use.grammar and turn.schema_grammar:
        raise bad_request("Structured output cannot be combined with a required tool call.",
                          turn.schema_param)
    prompt = await chat_prompt(entry, turn.messages, use) + turn.prefill
    if use.grammar:
        return Prepared(entry, prompt, use, use.grammar, "tools")
    return Prepared(entry, prompt, use, turn.schema_grammar, turn.schema_param)


async def count_tokens(prepared: Prepared) -> int:
    entry = prepared.entry
    entry.active += 1  # so that the TTL reaper leaves the model alone meanwhile
    try:
        return await asyncio.to_thread(entry.instance.count_prompt_tokens, prepared.prompt)
    finally:
        entry.active -= 1
        entry.touch()


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
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    closed: bool = False


@dataclass
class Opened:
    block: Block


@dataclass
class Grew:
    block: Block
    text: str


@dataclass
class Closed:
    block: Block


BlockEvent = Opened | Grew | Closed


class Blocks:
    """Turn events as blocks that open, grow and close in the order of the reply: what both
    APIs send (Responses' output items, Anthropic's content blocks)."""

    def __init__(self) -> None:
        self.all: list[Block] = []
        self._open: Block | None = None

    def feed(self, events: list[TurnEvent]) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                self._grow(out, "reasoning", event.text)
            elif isinstance(event, ContentDelta):
                self._grow(out, "text", event.text)
            elif isinstance(event, CallStart):
                block = self._start(out, "call")
                block.call_id, block.name = event.id, event.name
            elif isinstance(event, CallArgs):
                self._grow(out, "call", event.text)
            elif isinstance(event, CallEnd) and self._open is not None:
                self._open.arguments = event.arguments
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


# -- running a turn ----------------------------------------------------------------------------

@dataclass
class Finished:
    stats: PredictionStats  # stop_reason "toolCalls" when the reply called a tool


@dataclass
class Failure:
    event: Failed  # the prediction failed after it started

    @property
    def message(self) -> str:
        return self.event.message


class Turn:
    """One prediction whose output arrives as block events, or whole."""

    def __init__(self, request: Request, prepared: Prepared, params: SamplingParams,
                 call_id_prefix: str = "call_") -> None:
        self.request, self.prepared, self.params = request, prepared, params
        self.parser = TurnParser(prepared.use, prepared.prompt, call_id_prefix,
                                 think=prepared.grammar is None)
        self.blocks = Blocks()
        self.prompt_tokens = 0  # known once started
        self.cached_tokens = 0
        self.reasoning_tokens = 0  # estimated from the fragments' token counts
        self.finished: Finished | None = None  # set before the last blocks close
        self._running: Running | None = None

    async def start(self) -> None:
        """Submit the prediction; errors up to its first event are HTTP errors."""
        p = self.prepared
        await check_grammar(p.entry, p.grammar, p.grammar_param)
        self._running = Running(p.entry, PredictionRequest(p.prompt, self.params, p.grammar),
                                p.use.log_recovered())
        first = await self._running.first()
        if isinstance(first, PromptProgress):
            self.prompt_tokens, self.cached_tokens = first.total_tokens, first.cached_tokens

    async def stream(self, coalesce_s: float = STREAM_COALESCE_S
                     ) -> AsyncIterator[BlockEvent | Finished | Failure]:
        assert self._running is not None
        async with contextlib.aclosing(self._running.events(coalesce_s=coalesce_s)) as events:
            async for event in events:
                if isinstance(event, Fragment):
                    for block_event in self.blocks.feed(self._parse(event)):
                        yield block_event
                elif isinstance(event, Done):
                    closing = self._close()
                    self.finished = self._finished(event)
                    for block_event in closing:
                        yield block_event
                    yield self.finished
                elif isinstance(event, Failed):
                    yield Failure(event)

    async def whole(self) -> Finished:
        """Run to the end; the reply is then in ``blocks.all``. A client that disconnects
        meanwhile cancels the prediction: nobody is left to read the answer."""
        assert self._running is not None
        watcher = asyncio.create_task(_cancel_on_disconnect(self.request, self._running))
        try:
            # closed on the way out, so that the prediction's slot is released at once
            async with contextlib.aclosing(self.stream(coalesce_s=0.0)) as events:
                async for event in events:
                    if isinstance(event, Failure):
                        raise failure(event.event)
                    if isinstance(event, Finished):
                        return event
        finally:
            watcher.cancel()
        raise AssertionError("a prediction ends with Done or Failed")

    async def close(self) -> None:
        """Cancel the prediction if it still runs (the client left); safe to call twice."""
        if self._running is not None:
            self._running.close()

    def _parse(self, fragment: Fragment) -> list[TurnEvent]:
        events = self.parser.feed(fragment.text)
        thought = sum(len(e.text) for e in events if isinstance(e, ReasoningDelta))
        if thought:  # a fragment can straddle the end of the block: count its share
            share = fragment.tokens * thought / max(len(fragment.text), thought)
            self.reasoning_tokens += max(1, round(share))
        return events

    def _close(self) -> list[BlockEvent]:
        return self.blocks.feed(self.parser.feed("", final=True)) + self.blocks.close()

    def _finished(self, done: Done) -> Finished:
        stats = done.stats
        if self.parser.called:
            stats = dataclasses.replace(stats, stop_reason="toolCalls")
        self.prompt_tokens, self.cached_tokens = stats.prompt_tokens, stats.cached_tokens
        return Finished(stats)


class AnyTurn(Protocol):
    """What the renderers use of a turn: a local ``Turn``, or a linked engine's."""

    blocks: Blocks
    finished: Finished | None
    prompt_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    def stream(self) -> AsyncIterator[BlockEvent | Finished | Failure]: ...

    async def whole(self) -> Finished: ...

    async def close(self) -> None: ...


def turn_stream(turn: AnyTurn, content: AsyncIterator[bytes]) -> ClosingStream:
    """A turn's SSE stream; the turn ends with it, even if the client leaves before the
    first event (a linked turn closes its upstream, a local one cancels its prediction)."""
    return ClosingStream(content, turn.close, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})


class LinkedTurns(Protocol):
    """Turns on linked engines (the app's ``state.linked``): a started turn and the name the
    model is listed under, or None when the request's model is not a linked one."""

    async def open_turn(self, request: Request, wanted: TurnInput, params: SamplingParams,
                        call_id_prefix: str) -> tuple[str, AnyTurn] | None: ...


async def open_linked_turn(request: Request, wanted: TurnInput, params: SamplingParams,
                           call_id_prefix: str = "call_") -> tuple[str, AnyTurn] | None:
    """The started turn and the model's name when the request's model is a linked one."""
    linked: LinkedTurns | None = getattr(request.app.state, "linked", None)
    if linked is None:
        return None
    return await linked.open_turn(request, wanted, params, call_id_prefix)


async def open_turn(request: Request, body: Body, wanted: TurnInput, params: SamplingParams,
                    call_id_prefix: str = "call_") -> tuple[str, AnyTurn]:
    """The started turn for the request's model, linked or local (loaded on demand), and
    the model's identifier. Errors up to the first output are HTTP errors."""
    opened = await open_linked_turn(request, wanted, params, call_id_prefix)
    if opened is not None:
        return opened
    entry = await model_for(request, body)
    turn = Turn(request, await prepare(entry, wanted), params, call_id_prefix)
    await turn.start()
    return entry.identifier, turn


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its ``event:`` line (both APIs' SDKs dispatch on it)."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
