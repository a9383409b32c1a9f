"""The OpenAI-compatible surface (/v1) and LM Studio's REST extras (/api/v0)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from lmscli.engine import Done, Failed, Fragment, PredictionRequest, PredictionStats
from lmscli.prompting.tools import CallArgs, CallEnd, CallStart, ContentDelta, ParseEvent
from lmscli.server.errors import APIError, Body, bad_request, shorten
from lmscli.server.models import Loaded
from lmscli.server.parsing import (
    manager,
    model_for,
    parse_messages,
    read_json,
    request_grammar,
    sampling,
)
from lmscli.server.predict import Running, check_grammar, collect, sse
from lmscli.server.tooluse import Quiet, ToolUse, chat_prompt, tool_use

# Tokens that arrive within this long of the previous chunk share the next one: on a small
# machine a write and a client-side parse per token slow decoding down (see bench/).
STREAM_COALESCE_S = 0.025
FINISH = {"eosFound": "stop", "stopStringFound": "stop", "userStopped": "stop",
          "maxPredictedTokensReached": "length", "contextLengthReached": "length",
          "toolCalls": "tool_calls", "modelUnloaded": "stop", "failed": "stop"}




# -- responses ------------------------------------------------------------------------------

def usage(stats: PredictionStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.predicted_tokens,
            "total_tokens": stats.total_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def lmstudio_extras(entry: Loaded, stats: PredictionStats, engine: Any) -> dict[str, Any]:
    m = entry.model
    return {
        "stats": {"tokens_per_second": stats.tokens_per_second,
                  "time_to_first_token": stats.time_to_first_token_s,
                  "generation_time": stats.total_time_s - (stats.time_to_first_token_s or 0),
                  "stop_reason": stats.stop_reason,
                  "prompt_tokens": stats.prompt_tokens,
                  "cached_prompt_tokens": stats.cached_tokens},
        "model_info": {"arch": m.architecture, "quant": m.quantization, "format": "gguf",
                       "context_length": entry.instance.context_length},
        "runtime": {"name": engine.name, "version": engine.version,
                    "supported_formats": ["gguf"]},
    }


class Completion:
    """One chat or text completion request, answered whole or as an SSE stream."""

    def __init__(self, request: Request, entry: Loaded, prompt: str, body: Body, *,
                 chat: bool, rest: bool, use: ToolUse | None = None) -> None:
        self.request, self.entry, self.prompt, self.chat, self.rest = (
            request, entry, prompt, chat, rest)
        self.params = sampling(body)
        self.grammar = request_grammar(body, use)
        self.grammar_param = "tools" if use and use.grammar else "response_format"
        self.use = use
        self.parser = use.parser() if use else None
        self.stream = bool(body.get("stream", bool, False))
        opts = body.get("stream_options", dict, {})
        self.include_usage = bool(Body(opts, "stream_options").get("include_usage", bool, False))
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    async def respond(self) -> Any:
        await check_grammar(self.entry, self.grammar, self.grammar_param)
        running = Running(self.entry, PredictionRequest(self.prompt, self.params, self.grammar),
                          self.use.recovered_calls if self.parser and self.use else None)
        await running.first()  # errors before the first event become proper HTTP errors
        if self.stream:
            return StreamingResponse(self._stream(running), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, done = await collect(running, self.request)
        return JSONResponse(self._whole(text, done))

    def _base(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.entry.identifier, "system_fingerprint": self.entry.identifier}

    def _whole(self, text: str, done: Done) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.parser:
            events = self.parser.feed(text) + self.parser.finish()
            content = "".join(e.text for e in events if isinstance(e, ContentDelta))
            calls = [openai_call(c) for c in self.parser.calls]
            message = {"role": "assistant", "content": content or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
        done = self._with_tool_stop(done)
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": FINISH[done.stats.stop_reason]}
        if self.chat:
            choice["message"] = message
        else:
            choice["text"] = text
        out = self._base() | {"choices": [choice], "usage": usage(done.stats)}
        if self.rest:
            out |= lmstudio_extras(self.entry, done.stats, self.request.app.state.engine)
        return out

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, Any]:
        chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return self._base() | {"object": chunk_object, "choices": [choice]}

    async def _stream(self, running: Running) -> AsyncIterator[bytes]:
        if self.chat:
            yield sse(self._chunk({"role": "assistant", "content": ""}))
        quiet = Quiet()
        async for event in running.events(coalesce_s=STREAM_COALESCE_S):
            if isinstance(event, Fragment):
                text = event.text
                if self.parser:
                    chunks = self._tool_chunks(self.parser.feed(text))
                    for chunk in chunks:
                        yield chunk
                    if chunks:
                        quiet.sent()
                    elif quiet.due():
                        yield b": keep-alive\n\n"  # an SSE comment while a call is read
                else:
                    yield sse(self._chunk({"content": text} if self.chat else text))
            elif isinstance(event, Done):
                if self.parser:
                    for chunk in self._tool_chunks(self.parser.finish()):
                        yield chunk
                event = self._with_tool_stop(event)
                yield sse(self._final_chunk(event))
                if self.include_usage:
                    yield sse(self._base() | {"object": "chat.completion.chunk" if self.chat
                                              else "text_completion", "choices": [],
                                              "usage": usage(event.stats)})
            elif isinstance(event, Failed):
                yield sse({"error": {"message": event.message,
                                     "type": "server_error"}})
        yield sse("[DONE]")

    def _tool_chunks(self, events: list[ParseEvent]) -> list[bytes]:
        """Parser events as SSE chunks (events that change nothing send nothing)."""
        return [sse(self._chunk(delta)) for delta in map(tool_delta, events) if delta]

    def _with_tool_stop(self, done: Done) -> Done:
        if self.parser and self.parser.calls:
            return Done(dataclasses.replace(done.stats, stop_reason="toolCalls"))
        return done

    def _final_chunk(self, done: Done) -> dict[str, Any]:
        chunk = self._chunk({} if self.chat else "", FINISH[done.stats.stop_reason])
        if self.rest:
            chunk |= lmstudio_extras(self.entry, done.stats, self.request.app.state.engine)
        return chunk


# -- handlers -------------------------------------------------------------------------------

async def chat_completions(request: Request, rest: bool = False) -> Any:
    body = await read_json(request)
    messages = parse_messages(body)
    entry = await model_for(request, body)
    use = tool_use(body, entry)
    prompt = await chat_prompt(entry, messages, use)
    return await Completion(request, entry, prompt, body, chat=True, rest=rest,
                            use=use).respond()


def openai_call(call: CallEnd) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}


def tool_delta(event: ParseEvent) -> dict[str, Any] | None:
    """A parser event as an OpenAI chat delta (the SDK accumulates tool_calls by index)."""
    if isinstance(event, ContentDelta):
        return {"content": event.text} if event.text else None
    if isinstance(event, CallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    if isinstance(event, CallArgs):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
    return None


async def completions(request: Request, rest: bool = False) -> Any:
    body = await read_json(request)
    prompt = body.get("prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("Field 'prompt' must be a string (or an array of one string).",
                              "prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("Field 'prompt' must not be empty: there is nothing to complete.",
                          "prompt")
    entry = await model_for(request, body)
    return await Completion(request, entry, prompt, body, chat=False, rest=rest).respond()


async def embeddings(request: Request) -> Any:
    body = await read_json(request)
    texts = embedding_inputs(body)
    entry = await model_for(request, body)
    entry.active += 1
    try:
        vectors = await asyncio.to_thread(entry.instance.embed, texts)
    except ValueError as exc:  # llama-cpp-python: an input longer than the context
        raise bad_request(f"Cannot embed this input: {exc}", "input") from None
    finally:
        entry.active -= 1
        entry.touch()
    tokens = sum(len(t.split()) for t in texts)
    return JSONResponse({
        "object": "list", "model": entry.identifier,
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def embedding_inputs(body: Body) -> list[str]:
    """Non-empty strings only: llama.cpp corrupts its memory on an empty input."""
    texts = body.get("input", (str, list), required=True)
    texts = [texts] if isinstance(texts, str) else texts
    if not texts:
        raise bad_request("Field 'input' must not be an empty array.", "input")
    for i, text in enumerate(texts):
        where = "input" if isinstance(body.data["input"], str) else f"input[{i}]"
        if not isinstance(text, str):
            raise bad_request(f"'{where}' must be a string (token arrays are not supported).",
                              where)
        if not text:
            raise bad_request(f"'{where}' must not be empty: there is nothing to embed.", where)
    return texts


async def v1_models(request: Request) -> Any:
    models = manager(request)
    ids = list(models.loaded)
    ids += [m.model_key for m in models.downloaded() if m.model_key not in ids]
    return JSONResponse({"object": "list", "data": [
        {"id": i, "object": "model", "owned_by": "organization_owner"} for i in ids]})


def v0_model(model: Any, entry: Loaded | None) -> dict[str, Any]:
    out = {
        "id": entry.identifier if entry else model.model_key,
        "object": "model",
        "type": "embeddings" if model.type == "embedding" else "llm",
        "publisher": model.publisher,
        "arch": model.architecture,
        "compatibility_type": "gguf",
        "quantization": model.quantization,
        "state": "loaded" if entry else "not-loaded",
        "max_context_length": model.max_context_length,
    }
    if entry:
        out["loaded_context_length"] = entry.instance.context_length
    if model.trained_for_tool_use:
        out["capabilities"] = ["tool_use"]
    return out


async def v0_models(request: Request) -> Any:
    models = manager(request)
    data = [v0_model(e.model, e) for e in models.loaded.values()]
    loaded_keys = {e.model.model_key for e in models.loaded.values()}
    data += [v0_model(m, None) for m in models.downloaded() if m.model_key not in loaded_keys]
    return JSONResponse({"object": "list", "data": data})


async def v0_model_one(request: Request) -> Any:
    models = manager(request)
    name = request.path_params["model"]
    entry = models.find_loaded(name)
    if entry:
        return JSONResponse(v0_model(entry.model, entry))
    from lmscli import catalog

    model = catalog.find_model(name)
    if model is None:
        raise APIError(404, f'Model "{shorten(name)}" not found.', param="model",
                       code="model_not_found")
    return JSONResponse(v0_model(model, None))
