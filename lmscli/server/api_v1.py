"""LM Studio's REST API v1 (``/api/v1/*``, LM Studio 0.4): chat with stored responses and
``event:``-typed SSE, the model list, load and unload. Downloads are in ``api_v1_downloads``.

Errors use v1's body, ``{"error": {"type", "message", "code", "param"}}``, where ``type`` is
one of v1's (invalid_request, model_not_found, job_not_found, not_implemented,
internal_error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmscli.engine import (
    Done,
    Failed,
    Fragment,
    PredictionRequest,
    PredictionStats,
    PromptProgress,
)
from lmscli.server.errors import APIError, Body, bad_request, shorten
from lmscli.server.models import JIT_TTL_S, Loaded, LoadProgress
from lmscli.server.openai_api import STREAM_COALESCE_S
from lmscli.server.parsing import manager, parse_messages, read_json, sampling
from lmscli.server.predict import Running, collect, failure
from lmscli.server.tooluse import ToolUse, chat_prompt
from lmscli.server.turns import (
    AnyTurn,
    BlockEvent,
    Failure,
    Finished,
    Grew,
    Opened,
    TurnInput,
    open_linked_turn,
    turn_stream,
)

log = logging.getLogger("lmscli.server")

MAX_STORED = 1000  # responses kept for previous_response_id, oldest dropped first
REASONING = ("off", "low", "medium", "high", "on")
Handler = Callable[[Request], Awaitable[Response]]


# -- errors ---------------------------------------------------------------------------------

def v1_error_type(error: APIError) -> str:
    if error.code in ("model_not_found", "model_not_loaded"):
        return "model_not_found"
    if error.code == "job_not_found":
        return "job_not_found"
    if error.code == "not_implemented":
        return "not_implemented"
    return "internal_error" if error.status >= 500 else "invalid_request"


def v1_error_body(error: APIError) -> dict[str, Any]:
    return {"error": {"type": v1_error_type(error), "message": error.message,
                      "code": error.code, "param": error.param}}


def v1_errors(handler: Handler) -> Handler:
    """Answer an APIError with v1's error body (the app's handler writes OpenAI's)."""

    @wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return JSONResponse(v1_error_body(exc), status_code=exc.status, headers=exc.headers)

    return wrapped


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


@v1_errors
async def models_list(request: Request) -> Response:
    models = manager(request)
    loaded = sorted(models.loaded.values(), key=lambda e: e.loaded_at)
    return JSONResponse({"models": [
        model_entry(m, [e for e in loaded if e.model.model_key == m.model_key])
        for m in models.downloaded()]})


@v1_errors
async def models_load(request: Request) -> Response:
    body = await read_json(request)
    name = body.get("model", str, required=True)
    context_length = body.integer("context_length", low=1)
    for key, kind in (("eval_batch_size", int), ("num_experts", int),
                      ("flash_attention", bool), ("offload_kv_cache_to_gpu", bool)):
        body.get(key, kind)  # checked; llama.cpp's defaults stand (no GPU offload here)
    echo = body.get("echo_load_config", bool, False)
    models = manager(request)
    model = await models.check_load(name, None, context_length)
    started = time.perf_counter()
    entry = await models.load(model.model_key, context_length=context_length)
    out: dict[str, Any] = {"type": model.type, "instance_id": entry.identifier,
                           "load_time_seconds": round(time.perf_counter() - started, 3),
                           "status": "loaded"}
    if echo:
        out["load_config"] = instance_config(entry)
    return JSONResponse(out)


@v1_errors
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
        if body.get("integrations", list):
            # a 4xx: the request asks for what this server lacks, the server is not at fault
            raise APIError(400, "lmscli has no plugins or MCP servers: 'integrations' is not "
                           "supported.", param="integrations", code="not_implemented")
        self.messages = self._history(body) + [{"role": "user", "content": user_text(body)}]
        openai_body = {"messages": self.messages, "max_tokens": body.data.get(
            "max_output_tokens")} | {k: body.data[k] for k in (
                "temperature", "top_p", "top_k", "min_p", "repeat_penalty") if k in body.data}
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


def responses(request: Request) -> OrderedDict[str, list[dict[str, Any]]]:
    state = request.app.state
    if not hasattr(state, "v1_responses"):
        state.v1_responses = OrderedDict()
    return state.v1_responses


def remember(request: Request, messages: list[dict[str, Any]]) -> str:
    stored = responses(request)
    response_id = "resp_" + secrets.token_hex(12)
    stored[response_id] = messages
    while len(stored) > MAX_STORED:
        stored.popitem(last=False)
    return response_id


@v1_errors
async def chat(request: Request) -> Response:
    chat_request = ChatRequest(request, await read_json(request))
    linked = await open_linked_turn(request, TurnInput(chat_request.messages),
                                    chat_request.params)
    if linked is not None:
        return await linked_chat(chat_request, *linked)
    models = manager(request)
    entry = models.find_loaded(chat_request.name)
    if chat_request.stream:
        return StreamingResponse(Chat(chat_request, entry).sse(),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    load_s = None
    if entry is None:
        started = time.perf_counter()
        entry = await jit_load(chat_request)
        load_s = time.perf_counter() - started
    running = await start(chat_request, entry)
    text, done = await collect(running, request)
    return JSONResponse(result(chat_request, entry.identifier, message_items(text),
                               done.stats, load_s))


async def jit_load(chat_request: ChatRequest) -> Loaded:
    """LM Studio's just-in-time load, with the request's context_length; requests that ask
    at once load the model once."""
    models = manager(chat_request.request)
    model = models.resolve_downloaded(chat_request.name)
    async with models.load_lock(model.model_key):
        entry = models.find_loaded(chat_request.name)
        if entry is not None:
            return entry
        if (pending := models.pending(model.model_key)) is not None:  # an HTTP JIT load
            return await asyncio.shield(pending)
        await models.check_load(model.model_key, None, chat_request.context_length)
        return await models.load(model.model_key, context_length=chat_request.context_length,
                                 ttl_s=float(JIT_TTL_S), jit=True)


async def start(chat_request: ChatRequest, entry: Loaded) -> Running:
    if entry.model.type != "llm":
        raise bad_request(f'"{entry.identifier}" is an embedding model: it cannot chat.',
                          "model")
    use = ToolUse(None, "default", None)  # v1 chat takes no client-defined tools
    prompt = await chat_prompt(entry, parse_messages(chat_request.openai), use)
    running = Running(entry, PredictionRequest(prompt, chat_request.params))
    await running.first()
    return running


def message_items(text: str, reasoning: str = "") -> list[dict[str, Any]]:
    reasoned = [{"type": "reasoning", "content": reasoning}] if reasoning else []
    return [*reasoned, {"type": "message", "content": text}]


def result(chat_request: ChatRequest, identifier: str, output: list[dict[str, Any]],
           stats: PredictionStats, load_s: float | None, reasoning_tokens: int = 0
           ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_instance_id": identifier,
        "output": output,
        "stats": {"input_tokens": stats.prompt_tokens,
                  "total_output_tokens": stats.predicted_tokens,
                  "reasoning_output_tokens": reasoning_tokens,
                  "tokens_per_second": stats.tokens_per_second or 0.0,
                  "time_to_first_token_seconds": stats.time_to_first_token_s or 0.0}}
    if load_s is not None:
        out["stats"]["model_load_time_seconds"] = round(load_s, 3)
    if chat_request.store:
        text = "".join(item["content"] for item in output if item["type"] == "message")
        history = [*chat_request.messages, {"role": "assistant", "content": text}]
        out["response_id"] = remember(chat_request.request, history)
    return out


def event(kind: str, **data: Any) -> bytes:
    payload = json.dumps({"type": kind, **data}, ensure_ascii=False)
    return f"event: {kind}\ndata: {payload}\n\n".encode()


class Chat:
    """One streamed chat: chat.start, a JIT load's model_load.*, prompt_processing.*,
    message.*, then chat.end with the whole result (or an error event)."""

    def __init__(self, chat_request: ChatRequest, entry: Loaded | None) -> None:
        self.req = chat_request
        self.entry = entry
        self.load_s: float | None = None

    async def sse(self) -> AsyncIterator[bytes]:
        try:
            if self.entry is None:
                # a name that matches no model is an error event alone: no chat starts
                model = manager(self.req.request).resolve_downloaded(self.req.name)
                yield event("chat.start", model_instance_id=model.model_key)
                async for chunk in self._load(model):
                    yield chunk
            else:
                yield event("chat.start", model_instance_id=self.entry.identifier)
            assert self.entry is not None
            running = await start(self.req, self.entry)
            async for chunk in self._predict(running):
                yield chunk
        except APIError as exc:
            yield event("error", error=v1_error_body(exc)["error"])
        except Exception as exc:  # the stream has begun: the error goes in it
            log.exception("/api/v1/chat failed")
            yield event("error", error=v1_error_body(APIError(
                500, f"Internal server error: {type(exc).__name__}: {exc}"))["error"])

    async def _load(self, model: Any) -> AsyncIterator[bytes]:
        models = manager(self.req.request)
        async with models.load_lock(model.model_key):
            self.entry = models.find_loaded(self.req.name)
            if self.entry is None and (pending := models.pending(model.model_key)):
                self.entry = await asyncio.shield(pending)
            if self.entry is not None:
                return
            await models.check_load(model.model_key, None, self.req.context_length)
            key = model.model_key
            yield event("model_load.start", model_instance_id=key)
            events = models.load_events(key, context_length=self.req.context_length,
                                        ttl_s=float(JIT_TTL_S), jit=True)
            try:
                async for item in events:
                    if isinstance(item, LoadProgress):
                        yield event("model_load.progress", model_instance_id=key,
                                    progress=item.progress)
                    else:
                        self.entry, self.load_s = item.entry, item.seconds
            finally:
                await events.aclose()  # the client left: abort the load
            assert self.entry is not None
            yield event("model_load.end", model_instance_id=self.entry.identifier,
                        load_time_seconds=round(self.load_s or 0.0, 3))

    async def _predict(self, running: Running) -> AsyncIterator[bytes]:
        assert self.entry is not None
        yield event("prompt_processing.start")
        parts: list[str] = []
        async for item in running.events(coalesce_s=STREAM_COALESCE_S):
            if isinstance(item, PromptProgress):
                yield event("prompt_processing.progress", progress=item.progress)
            elif isinstance(item, Fragment):
                if not parts:
                    yield event("prompt_processing.end") + event("message.start")
                parts.append(item.text)
                yield event("message.delta", content=item.text)
            elif isinstance(item, Failed):
                raise failure(item)
            elif isinstance(item, Done):
                if not parts:
                    yield event("prompt_processing.end") + event("message.start")
                body = result(self.req, self.entry.identifier, message_items("".join(parts)),
                              item.stats, self.load_s)
                yield event("message.end") + event("chat.end", result=body)


# -- a linked model ---------------------------------------------------------------------------

async def linked_chat(chat_request: ChatRequest, identifier: str, turn: AnyTurn) -> Response:
    """A chat on a linked engine (the turn already started there): nothing loads here."""
    if chat_request.stream:
        return turn_stream(turn, linked_events(chat_request, identifier, turn))
    finished = await turn.whole()
    return JSONResponse(linked_result(chat_request, identifier, turn, finished))


def linked_result(chat_request: ChatRequest, identifier: str, turn: AnyTurn,
                  finished: Finished) -> dict[str, Any]:
    blocks = turn.blocks.all
    text = "".join(b.text for b in blocks if b.kind == "text")
    reasoning = "".join(b.text for b in blocks if b.kind == "reasoning")
    return result(chat_request, identifier, message_items(text, reasoning), finished.stats,
                  None, turn.reasoning_tokens)


async def linked_events(chat_request: ChatRequest, identifier: str, turn: AnyTurn
                        ) -> AsyncIterator[bytes]:
    # the upstream read the prompt before its first chunk: progress is all or nothing
    yield event("chat.start", model_instance_id=identifier) + \
        event("prompt_processing.start") + event("prompt_processing.end")
    said = False
    async for item in turn.stream():
        if isinstance(item, Failure):
            yield event("error", error=v1_error_body(APIError(
                502, item.message, type_="server_error", code="upstream_failed"))["error"])
        elif isinstance(item, Finished):
            if not said:  # an empty answer is still a message
                yield event("message.start") + event("message.end")
            body = linked_result(chat_request, identifier, turn, item)
            yield event("chat.end", result=body)
        elif item.block.kind != "call":  # v1 chat sends no client tools: none are called
            said = said or item.block.kind == "text"
            yield block_event(item)


def block_event(item: BlockEvent) -> bytes:
    kind = "message" if item.block.kind == "text" else "reasoning"
    if isinstance(item, Opened):
        return event(f"{kind}.start")
    if isinstance(item, Grew):
        return event(f"{kind}.delta", content=item.text)
    return event(f"{kind}.end")
