"""LM Studio's REST API v1 (``/api/v1/*``, LM Studio 0.4): chat with stored responses and
``event:``-typed SSE, the model list, load and unload. Downloads are in ``api_v1_downloads``.

Errors use v1's body, ``{"error": {"type", "message", "code", "param"}}``, where ``type`` is
one of v1's (invalid_request, model_not_found, job_not_found, not_implemented,
internal_error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmscli.engine import PromptProgress
from lmscli.server.apis import api_v1_tools
from lmscli.server.apis.parsing import (
    DRAFT_FIELDS,
    load_drafting,
    manager,
    parse_messages,
    read_json,
    sampling,
)
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request, rest_v1_body, shorten
from lmscli.server.models import Loaded, LoadProgress, LoadStart
from lmscli.server.pipeline.local import start_turn
from lmscli.server.pipeline.turns import (
    AnyTurn,
    Block,
    BlockEvent,
    Closed,
    Failure,
    Finished,
    Grew,
    Idle,
    Opened,
    TurnInput,
    assistant_message,
)
from lmscli.server.state import Kept, app_state
from lmscli.server.streams import sse_event, sse_stream

log = logging.getLogger("lmscli.server")

MAX_STORED = 1000  # responses kept for previous_response_id, oldest dropped first
REASONING = ("off", "low", "medium", "high", "on")


# -- models ---------------------------------------------------------------------------------

def model_entry(model: Any, instances: list[Loaded]) -> dict[str, Any]:
    info = model.model_info()
    quant = info.get("quantization")
    out: dict[str, Any] = {
        "type": model.type, "publisher": info.get("publisher"), "key": model.model_key,
        "display_name": info.get("displayName"), "architecture": info.get("architecture"),
        "quantization": {"name": quant["name"], "bits_per_weight": quant["bits"]}
        if quant else None,
        "size_bytes": info.get("sizeBytes"), "params_string": info.get("paramsString"),
        "loaded_instances": [{"id": e.identifier, "config": instance_config(e)}
                             for e in instances],
        "max_context_length": info.get("maxContextLength"), "format": "gguf",
    }
    if model.type == "llm":
        out["capabilities"] = {"vision": False,
                               "trained_for_tool_use": bool(info.get("trainedForToolUse"))}
    return out


def instance_config(entry: Loaded) -> dict[str, Any]:
    config: dict[str, Any] = {"context_length": entry.instance.context_length}
    if entry.model.type == "llm":
        config["parallel"] = entry.instance.parallel
    return config


async def models_list(request: Request) -> Response:
    models = manager(request)
    loaded = sorted(models.loaded.values(), key=lambda e: e.loaded_at)
    return JSONResponse({"models": [
        model_entry(m, [e for e in loaded if e.model.model_key == m.model_key])
        for m in models.downloaded()]})


async def models_load(request: Request) -> Response:
    body = await read_json(request)
    name = body.get("model", str, required=True)
    context_length = body.integer("context_length", low=1)
    for key, kind in (("eval_batch_size", int), ("num_experts", int),
                      ("flash_attention", bool), ("offload_kv_cache_to_gpu", bool)):
        body.get(key, kind)  # checked; llama.cpp's defaults stand (no GPU offload here)
    echo = body.get("echo_load_config", bool, False)
    drafting = load_drafting(body)
    models = manager(request)
    model = models.resolve_downloaded(name)
    started = time.perf_counter()
    # as LM Studio: a model that is loaded is answered with, unless the request asks for
    # another context length (or other drafting); calls at once load it once
    async with models.load_lock(model.model_key):
        entry = models.reusable(model.model_key, context_length)
        if entry is None or not drafts_as(entry, body, drafting):
            await models.check_load(model.model_key, None, context_length)
            entry = await models.load(model.model_key, context_length=context_length,
                                      **drafting)
    out: dict[str, Any] = {"type": model.type, "instance_id": entry.identifier,
                           "load_time_seconds": round(time.perf_counter() - started, 3),
                           "status": "loaded"}
    if echo:
        out["load_config"] = instance_config(entry)
    return JSONResponse(out)


def drafts_as(entry: Loaded, body: Body, drafting: dict[str, Any]) -> bool:
    """Whether the instance drafts as the load asks (``drafting``: ``load_drafting``'s
    keywords); any instance does for a load that names no draft field."""
    if not any(key in body.data for key in DRAFT_FIELDS):
        return True
    options = entry.instance.options
    return (options.draft_model, options.draft_max, options.draft_min) == (
        drafting["draft_model"], drafting["draft_max"], drafting["draft_min"])


async def models_unload(request: Request) -> Response:
    body = await read_json(request)
    entry = await manager(request).unload(body.get("instance_id", str, required=True))
    return JSONResponse({"instance_id": entry.identifier})


# -- chat -----------------------------------------------------------------------------------

class ChatRequest:
    """A parsed ``POST /api/v1/chat``: messages, sampling and options, checked up front."""

    def __init__(self, request: Request, body: Body) -> None:
        self.request = request
        self.name = body.get("model", str, required=True)
        self.stream = body.get("stream", bool, False)
        self.store = body.get("store", bool, True)
        self.context_length = body.integer("context_length", low=1)
        reasoning = body.get("reasoning", str)
        if reasoning is not None and reasoning not in REASONING:
            raise bad_request(f"'reasoning' must be one of {', '.join(REASONING)}.",
                              "reasoning")
        self.sources = api_v1_tools.parse(body, app_state(request).settings.allow_local_mcp)
        self.messages = self._history(body) + [{"role": "user", "content": user_text(body)}]
        openai_body = {"messages": self.messages, "max_tokens": body.data.get(
            "max_output_tokens")} | {k: body.data[k] for k in (
                "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "speculative",
                *DRAFT_FIELDS) if k in body.data}
        self.openai = Body(openai_body)
        self.params = sampling(self.openai)
        parse_messages(self.openai)  # the same checks as /v1

    def _history(self, body: Body) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id", str)
        if previous is not None:
            stored = responses(self.request).get(previous)
            if stored is None:
                raise APIError(404, f'No stored response has the id "{shorten(previous)}".',
                               param="previous_response_id", code="response_not_found")
            history = [m for m in stored if m["role"] != "system"]
        system = body.get("system_prompt", str)
        return ([{"role": "system", "content": system}] if system else []) + history


def user_text(body: Body) -> str:
    value = body.get("input", (str, list), required=True)
    text = value if isinstance(value, str) else _item_text(value)
    if not text:
        raise bad_request("'input' must not be empty.", "input")
    return text


def _item_text(value: list[Any]) -> str:
    parts = []
    for i, raw in enumerate(value):
        item = Body(raw, f"input[{i}]")
        kind = item.get("type", str, required=True)
        if kind == "image":
            raise bad_request(f"'input[{i}]' is an image: lmscli's models take text only.",
                              f"input[{i}]")
        if kind not in ("message", "text"):
            raise bad_request(f"'input[{i}].type' must be message, text or image.",
                              f"input[{i}].type")
        parts.append(item.get("content", str) or item.get("text", str, ""))
    return "\n\n".join(parts)


def responses(request: Request) -> Kept[list[dict[str, Any]]]:
    """Each stored chat's whole history, by response id."""
    return app_state(request).part("api_v1_chat", lambda: Kept(MAX_STORED))


def remember(request: Request, messages: list[dict[str, Any]]) -> str:
    response_id = "resp_" + secrets.token_hex(12)
    responses(request).put(response_id, messages)
    return response_id


async def chat(request: Request) -> Response:
    chat_request = ChatRequest(request, await read_json(request))
    reply = ChatReply(chat_request)
    try:
        response = await answer(reply)
    except BaseException:
        await reply.close()
        raise
    if not chat_request.stream:  # a stream closes the reply once it has been sent
        await reply.close()
    return response


async def answer(reply: ChatReply) -> Response:
    """The chat's answer, whole or as a stream, on a linked or local model."""
    chat_request, request = reply.req, reply.req.request
    await reply.start_tools()
    linked = await app_state(request).linked.open_turn(
        request, chat_request.name, reply.wanted(), chat_request.params)
    if linked is not None:
        reply.identifier, reply.turn = linked
        if chat_request.stream:
            return sse_stream(reply.events(), reply.close)
        return JSONResponse(await reply.whole())
    if chat_request.stream:
        # the load and the prompt's progress are events of the stream
        return sse_stream(reply.local_events(), reply.close)
    async for _ in reply.load():  # a whole answer: the load's events are not sent
        pass
    await reply.start()
    return JSONResponse(await reply.whole())


def message_items(blocks: list[Block], final: bool = True) -> list[dict[str, Any]]:
    """A round's output items: its reasoning, then its message (the last round's even when
    empty: an answer is a message). Its tool calls become items as they run."""
    reasoning = "".join(b.text for b in blocks if b.kind == "reasoning")
    text = "".join(b.text for b in blocks if b.kind == "text")
    reasoned = [{"type": "reasoning", "content": reasoning}] if reasoning else []
    said = [{"type": "message", "content": text}] if text or final else []
    return [*reasoned, *said]


def event(kind: str, **data: Any) -> bytes:
    return sse_event(kind, {"type": kind, **data})


class ChatReply:
    """One chat's answer, local or linked: whole, or streamed as chat.start, a JIT load's
    model_load.*, prompt_processing.*, reasoning.* and message.*, then chat.end with the
    whole result (or an error event)."""

    def __init__(self, chat_request: ChatRequest) -> None:
        self.req = chat_request
        self.entry: Loaded | None = None  # a local model, once known
        self.identifier = ""
        self.turn: AnyTurn | None = None
        self.load_s: float | None = None
        self.messages = list(chat_request.messages)  # grows by each round of tool calls
        self.toolset: api_v1_tools.Toolset | None = None  # the integrations' servers
        self.items: list[dict[str, Any]] = []  # the output of the rounds so far
        self.rounds = 0
        self.done_calls: dict[str, dict[str, Any]] = {}  # each call made, by name and args
        self.output_tokens = 0  # of the rounds before this one
        self.reasoning_tokens = 0

    async def start_tools(self) -> None:
        if self.req.sources:
            pool = app_state(self.req.request).part("mcp_pool", api_v1_tools.Pool)
            self.toolset = api_v1_tools.Toolset(self.req.sources, pool)
            await self.toolset.start()

    def wanted(self) -> TurnInput:
        """The next round: the conversation so far, with the tools until the last round."""
        tools = self.toolset.openai_tools() if self.toolset else None
        if self.rounds >= api_v1_tools.MAX_TOOL_ROUNDS:
            tools = None
        return TurnInput(self.messages, tools or None)

    async def start(self) -> None:
        assert self.entry is not None
        self.identifier = self.entry.identifier
        self.turn = await start_turn(self.entry, self.wanted(), self.req.params,
                                     request=self.req.request)

    async def next_round(self) -> None:
        if self.entry is not None:
            await self.start()
            return
        linked = await app_state(self.req.request).linked.open_turn(
            self.req.request, self.req.name, self.wanted(), self.req.params)
        assert linked is not None
        self.identifier, self.turn = linked

    async def whole(self) -> dict[str, Any]:
        while True:
            assert self.turn is not None
            finished = await self.turn.whole()
            calls = self.end_round(finished)
            if not calls:
                return self.result(finished)
            for block in calls:
                await self.run_call(block)
            await self.next_round()

    def end_round(self, finished: Finished) -> list[Block]:
        """The round's items; the calls to run, if tools may still be called."""
        assert self.turn is not None
        blocks = self.turn.blocks.all
        calls = [b for b in blocks if b.kind == "call"] if self.toolset else []
        self.items += message_items(blocks, final=not calls)
        self.output_tokens += finished.stats.predicted_tokens
        self.reasoning_tokens += self.turn.reasoning_tokens
        if calls:
            self.rounds += 1
            self.messages.append(assistant_message(blocks))
            if all(call_key(b) in self.done_calls for b in calls):
                # a small model may ask for the same call again and again: it gets the
                # result once more, and the next round no tools, so that it answers
                self.rounds = api_v1_tools.MAX_TOOL_ROUNDS
        return calls

    async def run_call(self, block: Block) -> dict[str, Any]:
        """The call's output item; a call made before is answered from then, not run."""
        assert self.toolset is not None
        item = self.done_calls.get(call_key(block))
        if item is None:
            item = await self.toolset.call(block.name, block.arguments)
            self.done_calls[call_key(block)] = item
            self.items.append(item)
        self.messages.append(api_v1_tools.tool_message(block.call_id, item))
        return item

    async def close(self) -> None:
        if self.turn is not None:
            await self.turn.close()
        toolset, self.toolset = self.toolset, None
        if toolset is not None:
            await toolset.close()

    def result(self, finished: Finished) -> dict[str, Any]:
        assert self.turn is not None
        stats, output = finished.stats, self.items
        out: dict[str, Any] = {
            "model_instance_id": self.identifier,
            "output": output,
            "stats": {"input_tokens": stats.prompt_tokens,
                      "total_output_tokens": self.output_tokens,
                      "reasoning_output_tokens": self.reasoning_tokens,
                      "tokens_per_second": stats.tokens_per_second or 0.0,
                      "time_to_first_token_seconds": stats.time_to_first_token_s or 0.0}}
        if self.load_s is not None:
            out["stats"]["model_load_time_seconds"] = round(self.load_s, 3)
        if self.req.store:
            text = output[-1]["content"]
            history = [*self.messages, {"role": "assistant", "content": text}]
            out["response_id"] = remember(self.req.request, history)
        return out

    async def local_events(self) -> AsyncIterator[bytes]:
        """A local chat's stream: the JIT load, if any, and the turn's start are in it."""
        try:
            # a name that matches no model is an error event alone: no chat starts
            async for chunk in self.load():
                yield chunk
            yield event("prompt_processing.start")
            await self.start()
        except APIError as exc:
            yield event("error", error=rest_v1_body(exc)["error"])
            return
        except Exception as exc:  # the stream has begun: the error goes in it
            log.exception("/api/v1/chat failed")
            yield event("error", error=rest_v1_body(APIError(
                500, f"Internal server error: {type(exc).__name__}: {exc}"))["error"])
            return
        async for chunk in self._turn_events():
            yield chunk

    async def events(self) -> AsyncIterator[bytes]:
        """A linked chat's stream: its turn has started upstream."""
        yield event("chat.start", model_instance_id=self.identifier) + \
            event("prompt_processing.start")
        async for chunk in self._turn_events():
            yield chunk

    async def _turn_events(self) -> AsyncIterator[bytes]:
        """The rounds' events: each round's reasoning and message, its tool calls as they
        are read and run, then the next round, until one answers without calls."""
        while True:
            finished: Finished | None = None
            async for chunk in self._round_events():
                if isinstance(chunk, Finished):
                    finished = chunk
                else:
                    yield chunk
            if finished is None:
                return  # the round failed: its error event was sent
            calls = self.end_round(finished)
            if not calls:
                if not self.items[-1]["content"]:  # the last round's message: none was sent
                    yield event("message.start") + event("message.end")  # still a message
                yield event("chat.end", result=self.result(finished))
                return
            for block in calls:
                yield call_event(await self.run_call(block))
            yield event("prompt_processing.start")
            try:
                await self.next_round()
            except APIError as exc:
                yield event("error", error=rest_v1_body(exc)["error"])
                return

    async def _round_events(self) -> AsyncIterator[bytes | Finished]:
        assert self.turn is not None
        reading = True  # the prompt is being read
        async for item in self.turn.stream():
            if isinstance(item, PromptProgress):
                yield event("prompt_processing.progress", progress=item.progress)
                continue
            if reading and not isinstance(item, Idle):
                reading = False
                yield event("prompt_processing.end")
            if isinstance(item, Failure):
                yield event("error", error=rest_v1_body(APIError(
                    500, f"Prediction failed: {item.message}", type_="server_error",
                    code="prediction_failed"))["error"])
            elif isinstance(item, Finished):
                yield item
            elif isinstance(item, Idle):
                continue
            elif item.block.kind == "call":
                if isinstance(item, Closed) and self.toolset is not None:
                    yield call_start_events(self.toolset, item.block)
            else:
                yield block_event(item)

    async def load(self) -> AsyncIterator[bytes]:
        """``chat.start``, after LM Studio's just-in-time load (with the request's
        context_length) when the model must load first: ``model_load.*``."""
        models = app_state(self.req.request).models
        key = ""
        async with contextlib.aclosing(models.get_or_load_events(
                self.req.name, context_length=self.req.context_length)) as events:
            async for item in events:
                if isinstance(item, LoadStart):
                    key = item.model.model_key
                    yield event("chat.start", model_instance_id=key) + \
                        event("model_load.start", model_instance_id=key)
                elif isinstance(item, LoadProgress):
                    yield event("model_load.progress", model_instance_id=key,
                                progress=item.progress)
                elif item.seconds is None:  # it was loaded
                    self.entry = item.entry
                    yield event("chat.start", model_instance_id=item.entry.identifier)
                else:
                    self.entry, self.load_s = item.entry, item.seconds
                    yield event("model_load.end", model_instance_id=item.entry.identifier,
                                load_time_seconds=round(item.seconds, 3))


def call_key(block: Block) -> str:
    return json.dumps([block.name, block.arguments], sort_keys=True)


def call_start_events(toolset: api_v1_tools.Toolset, block: Block) -> bytes:
    """A call the model wrote: ``tool_call.start`` and ``.arguments`` (a name that was not
    offered has only its failure, once it is run)."""
    source = toolset.by_name.get(block.name)
    if source is None:
        return b""
    info = source.provider_info
    return event("tool_call.start", tool=block.name, provider_info=info) + event(
        "tool_call.arguments", tool=block.name, arguments=block.arguments, provider_info=info)


def call_event(item: dict[str, Any]) -> bytes:
    if item["type"] == "invalid_tool_call":
        return event("tool_call.failure", reason=item["reason"], metadata=item["metadata"])
    return event("tool_call.success", **{k: item[k] for k in (
        "tool", "arguments", "output", "provider_info")})


def block_event(item: BlockEvent) -> bytes:
    kind = "message" if item.block.kind == "text" else "reasoning"
    if isinstance(item, Opened):
        return event(f"{kind}.start")
    if isinstance(item, Grew):
        return event(f"{kind}.delta", content=item.text)
    return event(f"{kind}.end")
