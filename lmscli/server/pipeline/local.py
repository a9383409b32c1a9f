"""The one way a prediction runs on a local model, whatever API asked for it.

Every API turns its request into a ``TurnInput``; ``prepare`` makes it a prompt, tool use and
at most one grammar; a ``Turn`` runs it on the engine and streams the reply as the events of
``turns.py`` (prompt progress, blocks of reasoning, text and tool calls, then its end), which
each API renders in its own shape, whole or streamed. ``open_turn`` also reaches linked
engines, whose turns stream the same events. No other module builds a prompt or submits to
the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from lmscli.engine import (
    Done,
    Failed,
    Fragment,
    PromptProgress,
    SamplingParams,
)
from lmscli.prompting.tools import input_call_grammar
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request
from lmscli.server.models import Loaded
from lmscli.server.pipeline.running import Running, check_grammar, failure
from lmscli.server.pipeline.tooluse import ToolUse, chat_prompt, tool_use
from lmscli.server.pipeline.turns import (
    AnyTurn,
    BlockEvent,
    Blocks,
    Failure,
    Finished,
    Grew,
    Idle,
    ReasoningDelta,
    TurnEvent,
    TurnInput,
    TurnOutput,
    TurnParser,
    prediction_request,
)
from lmscli.server.state import app_state
from lmscli.server.streams import STREAM_COALESCE_S, watch_disconnect

# While the parser holds text back (a call being read), a stream sends nothing; past this
# long it sends something that clients skip, so that their read timeouts don't fire.
KEEPALIVE_S = 5.0


# -- the local model a request names -----------------------------------------------------------

def ttl_of(body: Body) -> float | None:
    ttl = body.integer("ttl", low=1)
    return float(ttl) if ttl is not None else None


async def model_for(request: Request, body: Body) -> Loaded:
    name = body.get("model", str, required=True)
    return await app_state(request).models.get_or_load(name, ttl_s=ttl_of(body))


async def predict_model(request: Request, body: Body) -> Loaded:
    """The named model (get-or-load), or the first loaded one when none is named."""
    models = app_state(request).models
    if body.get("model", str):
        return await model_for(request, body)
    if not models.loaded:
        raise APIError(404, "No models are currently loaded. Load one with: lms load",
                       param="model", code="model_not_loaded")
    entry = sorted(models.loaded.values(), key=lambda e: e.loaded_at)[0]
    entry.touch()
    return entry


# -- preparing ---------------------------------------------------------------------------------

@dataclass
class Prepared:
    entry: Loaded
    prompt: str  # the exact text the model reads
    use: ToolUse
    grammar: str | None  # a forced call or a schema: at most one
    grammar_param: str  # where the grammar came from, for errors
    raw: bool = False  # text to complete: the reply comes back unsplit


async def prepare(entry: Loaded, wanted: TurnInput) -> Prepared:
    """Tool use, the exact prompt and the one grammar (a forced call or a schema)."""
    if entry.model.type != "llm":
        raise bad_request(f'"{entry.identifier}" is an embedding model: it cannot chat.',
                          "model")
    if wanted.prompt is not None:
        prepared = Prepared(entry, wanted.prompt, ToolUse(None, "default", None),
                            wanted.schema_grammar, wanted.schema_param, raw=True)
    else:
        prepared = await _chat(entry, wanted)
    await check_grammar(entry, prepared.grammar, prepared.grammar_param)
    return prepared


async def _chat(entry: Loaded, wanted: TurnInput) -> Prepared:
    use = tool_use(Body({"tools": wanted.tools, "tool_choice": wanted.tool_choice}), entry)
    if use.grammar and wanted.input_grammar and isinstance(wanted.tool_choice, dict):
        name = wanted.tool_choice["function"]["name"]
        grammar = input_call_grammar(name, use.fmt, wanted.input_grammar)
        use = dataclasses.replace(use, grammar=grammar)
    if use.grammar and wanted.schema_grammar:
        raise bad_request("Structured output cannot be combined with a required tool call.",
                          wanted.schema_param)
    prompt = await chat_prompt(entry, wanted.messages, use) + wanted.prefill
    if use.grammar:
        return Prepared(entry, prompt, use, use.grammar, "tools")
    return Prepared(entry, prompt, use, wanted.schema_grammar, wanted.schema_param)


async def count_tokens(prepared: Prepared) -> int:
    with prepared.entry.lease():
        return await asyncio.to_thread(prepared.entry.instance.count_prompt_tokens,
                                       prepared.prompt)


# -- running -----------------------------------------------------------------------------------

class Quiet:
    """How long a stream has sent nothing; ``due()`` says when to send a keep-alive."""

    def __init__(self) -> None:
        self.since = time.monotonic()

    def sent(self) -> None:
        self.since = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.since < KEEPALIVE_S:
            return False
        self.sent()
        return True


class Turn:
    """One local prediction whose output arrives as turn events, or whole."""

    def __init__(self, prepared: Prepared, params: SamplingParams,
                 call_id_prefix: str = "call_", request: Request | None = None) -> None:
        self.prepared, self.params, self.request = prepared, params, request
        # raw text, or a grammar shaping the whole reply: nothing in it is reasoning
        think = prepared.grammar is None and not prepared.raw
        self.parser = TurnParser(prepared.use, prepared.prompt, call_id_prefix, think=think)
        self.blocks = Blocks()
        self.prompt_tokens = 0  # known once started
        self.cached_tokens = 0
        self.reasoning_tokens = 0  # estimated from the fragments' token counts
        self.finished: Finished | None = None  # set before the last blocks close
        self._running: Running | None = None
        self._unsent_tokens = 0  # of fragments whose text is held back or shows as none

    async def start(self) -> None:
        """Submit the prediction; errors up to its first event are HTTP errors."""
        p = self.prepared
        self._running = Running(p.entry, prediction_request(p.prompt, self.params, p.grammar),
                                p.use.log_recovered())
        try:
            first = await self._running.first()
        except BaseException:
            # a refusal, or the client left while it waited for a slot: release it now
            self._running.close()
            raise
        if isinstance(first, PromptProgress):
            self.prompt_tokens, self.cached_tokens = first.total_tokens, first.cached_tokens

    async def stream(self, coalesce_s: float = STREAM_COALESCE_S
                     ) -> AsyncIterator[TurnOutput]:
        assert self._running is not None
        quiet = Quiet()
        async with contextlib.aclosing(self._running.events(coalesce_s=coalesce_s)) as events:
            async for event in events:
                if isinstance(event, PromptProgress):
                    yield event
                elif isinstance(event, Fragment):
                    out = self._blocks(event)
                    if out:
                        quiet.sent()
                    elif quiet.due():
                        yield Idle()
                    for block_event in out:
                        yield block_event
                elif isinstance(event, Done):
                    closing = self._close()
                    self.finished = self._finished(event)
                    for block_event in closing:
                        yield block_event
                    yield self.finished
                elif isinstance(event, Failed):
                    for block_event in self._close():  # what was held back, then why
                        yield block_event
                    yield Failure(event)

    async def whole(self) -> Finished:
        """Run to the end; the reply is then in ``blocks.all``. A client that disconnects
        meanwhile cancels the prediction: nobody is left to read the answer."""
        watcher = asyncio.create_task(watch_disconnect(self.request, self.cancel)) \
            if self.request is not None else None
        try:
            # closed on the way out, so that the prediction's slot is released at once
            async with contextlib.aclosing(self.stream(coalesce_s=0.0)) as events:
                async for event in events:
                    if isinstance(event, Failure):
                        raise failure(event.event)
                    if isinstance(event, Finished):
                        return event
        finally:
            if watcher is not None:
                watcher.cancel()
        raise AssertionError("a prediction ends with Done or Failed")

    def cancel(self) -> None:
        """Stop between tokens; the turn still ends, with the stop reason userStopped."""
        if self._running is not None:
            self._running.prediction.cancel()

    async def close(self) -> None:
        """Cancel the prediction if it still runs (the client left); safe to call twice."""
        if self._running is not None:
            self._running.close()

    def _blocks(self, fragment: Fragment) -> list[BlockEvent]:
        self._unsent_tokens += fragment.tokens
        return self._counted(self.blocks.feed(self._parse(fragment)))

    def _counted(self, out: list[BlockEvent]) -> list[BlockEvent]:
        """``out``, the tokens since the last text sent shared by the pieces they made (by
        length): text held back, and tags that show as no text, count with what follows."""
        grew = [e for e in out if isinstance(e, Grew)]
        if not grew:
            return out
        tokens, self._unsent_tokens = self._unsent_tokens, 0
        total = sum(len(e.text) for e in grew) or 1
        for event in grew[:-1]:
            event.tokens = round(tokens * len(event.text) / total)
            tokens -= event.tokens
        grew[-1].tokens = tokens
        return out

    def _parse(self, fragment: Fragment) -> list[TurnEvent]:
        events = self.parser.feed(fragment.text)
        thought = sum(len(e.text) for e in events if isinstance(e, ReasoningDelta))
        if thought:  # a fragment can straddle the end of the block: count its share
            share = fragment.tokens * thought / max(len(fragment.text), thought)
            self.reasoning_tokens += max(1, round(share))
        return events

    def _close(self) -> list[BlockEvent]:
        return self._counted(self.blocks.feed(self.parser.feed("", final=True))
                             + self.blocks.close())

    def _finished(self, done: Done) -> Finished:
        stats = done.stats
        if self.parser.called:
            stats = dataclasses.replace(stats, stop_reason="toolCalls")
        self.prompt_tokens, self.cached_tokens = stats.prompt_tokens, stats.cached_tokens
        return Finished(stats)


async def start_turn(entry: Loaded, wanted: TurnInput, params: SamplingParams, *,
                     call_id_prefix: str = "call_", request: Request | None = None) -> Turn:
    """A started local turn: prepared, submitted, its prompt being read."""
    turn = Turn(await prepare(entry, wanted), params, call_id_prefix, request)
    await turn.start()
    return turn


# -- local or linked ---------------------------------------------------------------------------

async def open_turn(request: Request, body: Body, wanted: TurnInput, params: SamplingParams,
                    call_id_prefix: str = "call_") -> tuple[str, AnyTurn]:
    """The started turn for the request's model, linked or local (loaded on demand), and
    the model's identifier. Errors up to the first output are HTTP errors."""
    name = body.data.get("model")
    linked = await app_state(request).linked.open_turn(request, name, wanted, params,
                                                          call_id_prefix)
    if linked is not None:
        return linked
    entry = await model_for(request, body)
    turn = await start_turn(entry, wanted, params, call_id_prefix=call_id_prefix,
                            request=request)
    return entry.identifier, turn
