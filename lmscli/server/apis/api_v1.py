"""LM Studio's REST API v1 (``/api/v1/*``, LM Studio 0.4): chat with stored responses and
``event:``-typed SSE, the model list, load and unload. Downloads are in ``api_v1_downloads``.

Errors use v1's body, ``{"error": {"type", "message", "code", "param"}}``, where ``type`` is
one of v1's (invalid_request, model_not_found, job_not_found, not_implemented,
internal_error).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmscli.engine import PromptProgress
from lmscli.server.apis.parsing import manager, parse_messages, read_json, sampling
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request, rest_v1_body, shorten
from lmscli.server.models import Loaded, LoadProgress, LoadStart
from lmscli.server.pipeline.local import start_turn
from lmscli.server.pipeline.turns import (
    AnyTurn,
    Block,
    BlockEvent,
    Failure,
    Finished,
    Grew,
    Idle,
    Opened,
    TurnInput,
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
    models = manager(request)
    model = models.resolve_downloaded(name)
    started = time.perf_counter()
    # as LM Studio: a model that is loaded is answered with, unless the request asks for
    # another context length; calls at once load it once
    async with models.load_lock(model.model_key):
        entry = models.reusable(model.model_key, context_length)
        if entry is None:
            await models.check_load(model.model_key, None, context_length)
            entry = await models.load(model.model_key, context_length=context_length)
    out: dict[str, Any] = {"type": model.type, "instance_id": entry.identifier,
                           "load_time_seconds": round(time.perf_counter() - started, 3),
                           "status": "loaded"}
    if echo:
        out["load_config"] = instance_config(entry)
    return JSONResponse(out)


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


def responses(request: Request) -> Kept[list[dict[str, Any]]]:
    """Each stored chat's whole history, by response id."""
    return app_state(request).part("api_v1_chat", lambda: Kept(MAX_STORED))


def remember(request: Request, messages: list[dict[str, Any]]) -> str:
    response_id = "resp_" + secrets.token_hex(12)
    responses(request).put(response_id, messages)
    return response_id


async def chat(request: Request) -> Response:
    chat_request = ChatRequest(request, await read_json(request))
    wanted = TurnInput(chat_request.messages)
    linked = await app_state(request).linked.open_turn(request, chat_request.name, wanted,
                                                          chat_request.params)
    reply = ChatReply(chat_request)
    if linked is not None:
        reply.identifier, reply.turn = linked
        if chat_request.stream:
            return sse_stream(reply.events(), reply.close)
        return JSONResponse(await reply.whole())
    if chat_request.stream:
        # the load and the prompt's progress are events of the stream
        return sse_stream(reply.local_events(wanted), reply.close)
    async for _ in reply.load():  # a whole answer: the load's events are not sent
        pass
    await reply.start(wanted)
    return JSONResponse(await reply.whole())


def message_items(blocks: list[Block]) -> list[dict[str, Any]]:
    """The reply's output items: its reasoning, then its message (an empty answer is still
    a message). v1 chat offers no client tools, so none are called."""
    reasoning = "".join(b.text for b in blocks if b.kind == "reasoning")
    text = "".join(b.text for b in blocks if b.kind == "text")
    reasoned = [{"type": "reasoning", "content": reasoning}] if reasoning else []
    return [*reasoned, {"type": "message", "content": text}]


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

    async def start(self, wanted: TurnInput) -> None:
        assert self.entry is not None
        self.identifier = self.entry.identifier
        self.turn = await start_turn(self.entry, wanted, self.req.params,
                                     request=self.req.request)

    async def whole(self) -> dict[str, Any]:
        assert self.turn is not None
        return self.result(await self.turn.whole())

    async def close(self) -> None:
        if self.turn is not None:
            await self.turn.close()

    def result(self, finished: Finished) -> dict[str, Any]:
        assert self.turn is not None
        stats, output = finished.stats, message_items(self.turn.blocks.all)
        out: dict[str, Any] = {
            "model_instance_id": self.identifier,
            "output": output,
            "stats": {"input_tokens": stats.prompt_tokens,
                      "total_output_tokens": stats.predicted_tokens,
                      "reasoning_output_tokens": self.turn.reasoning_tokens,
                      "tokens_per_second": stats.tokens_per_second or 0.0,
                      "time_to_first_token_seconds": stats.time_to_first_token_s or 0.0}}
        if self.load_s is not None:
            out["stats"]["model_load_time_seconds"] = round(self.load_s, 3)
        if self.req.store:
            text = output[-1]["content"]
            history = [*self.req.messages, {"role": "assistant", "content": text}]
            out["response_id"] = remember(self.req.request, history)
        return out

    async def local_events(self, wanted: TurnInput) -> AsyncIterator[bytes]:
        """A local chat's stream: the JIT load, if any, and the turn's start are in it."""
        try:
            # a name that matches no model is an error event alone: no chat starts
            async for chunk in self.load():
                yield chunk
            yield event("prompt_processing.start")
            await self.start(wanted)
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
        assert self.turn is not None
        reading, said = True, False  # the prompt is being read; a message was sent
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
                if not said:  # an empty answer is still a message
                    yield event("message.start") + event("message.end")
                yield event("chat.end", result=self.result(item))
            elif not isinstance(item, Idle) and item.block.kind != "call":
                said = said or item.block.kind == "text"
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


def block_event(item: BlockEvent) -> bytes:
    kind = "message" if item.block.kind == "text" else "reasoning"
    if isinstance(item, Opened):
        return event(f"{kind}.start")
    if isinstance(item, Grew):
        return event(f"{kind}.delta", content=item.text)
    return event(f"{kind}.end")
