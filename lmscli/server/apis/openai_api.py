"""The OpenAI-compatible surface (/v1) and LM Studio's REST extras (/api/v0)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmscli.engine import PredictionStats
from lmscli.server.apis.parsing import (
    chat_input,
    raw_input,
    read_json,
    sampling,
)
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request, shorten
from lmscli.server.links.linked import v0_entry, v1_entry
from lmscli.server.models import Loaded
from lmscli.server.pipeline.local import Turn, model_for, start_turn
from lmscli.server.pipeline.running import embed
from lmscli.server.pipeline.turns import Block, Failure, Finished, Grew, Idle, Opened, TurnInput
from lmscli.server.state import app_state
from lmscli.server.streams import SSE_KEEPALIVE, sse, sse_stream

# OpenAI's limits for one embeddings request: 2,048 inputs and 300,000 tokens (counted here
# as characters, four to a token, so that the check costs no tokenizing)
MAX_EMBED_INPUTS = 2048
MAX_EMBED_CHARS = 1_200_000
FINISH = {"eosFound": "stop", "stopStringFound": "stop", "userStopped": "stop",
          "maxPredictedTokensReached": "length", "contextLengthReached": "length",
          "toolCalls": "tool_calls", "modelUnloaded": "stop", "failed": "stop"}


# -- responses ------------------------------------------------------------------------------

def usage(stats: PredictionStats) -> dict[str, Any]:
    out = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.predicted_tokens,
           "total_tokens": stats.total_tokens,
           "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}
    if stats.drafts is not None:
        # OpenAI's fields for predicted outputs: drafted tokens the model did and didn't write
        drafted, accepted = stats.drafts
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def draft_stats(stats: PredictionStats) -> dict[str, Any]:
    """LM Studio's draft model (its key, when one drafted) and draft counts, in /api/v0's
    snake case, when the model drafted."""
    camel = stats.to_lms()
    return {name: camel[key] for name, key in (
        ("draft_model", "usedDraftModelKey"),
        ("total_draft_tokens_count", "totalDraftTokensCount"),
        ("accepted_draft_tokens_count", "acceptedDraftTokensCount"),
        ("rejected_draft_tokens_count", "rejectedDraftTokensCount"),
        ("ignored_draft_tokens_count", "ignoredDraftTokensCount")) if key in camel}


def lmstudio_extras(entry: Loaded, stats: PredictionStats, engine: Any) -> dict[str, Any]:
    m = entry.model
    return {
        "stats": {"tokens_per_second": stats.tokens_per_second,
                  "time_to_first_token": stats.time_to_first_token_s,
                  "generation_time": stats.total_time_s - (stats.time_to_first_token_s or 0),
                  "stop_reason": stats.stop_reason,
                  "prompt_tokens": stats.prompt_tokens,
                  "cached_prompt_tokens": stats.cached_tokens} | draft_stats(stats),
        "model_info": {"arch": m.architecture, "quant": m.quantization, "format": "gguf",
                       "context_length": entry.instance.context_length},
        "runtime": {"name": engine.name, "version": engine.version,
                    "supported_formats": ["gguf"]},
    }


class CompletionReply:
    """Renders one chat or text completion, whole or as an SSE stream of chunks."""

    def __init__(self, request: Request, body: Body, *, chat: bool, rest: bool) -> None:
        self.request, self.chat, self.rest = request, chat, rest
        self.stream = bool(body.get("stream", bool, False))
        opts = body.get("stream_options", dict, {})
        self.include_usage = bool(Body(opts, "stream_options").get("include_usage", bool, False))
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    async def respond(self, entry: Loaded, turn: Turn) -> Any:
        if self.stream:
            return sse_stream(self._stream(entry, turn), turn.close)
        finished = await turn.whole()
        return JSONResponse(self._whole(entry, turn.blocks.all, finished))

    def _base(self, entry: Loaded) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": entry.identifier, "system_fingerprint": entry.identifier}

    def _whole(self, entry: Loaded, blocks: list[Block], finished: Finished) -> dict[str, Any]:
        stats = finished.stats
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": FINISH[stats.stop_reason]}
        if self.chat:
            choice["message"] = chat_message(blocks)
        else:
            choice["text"] = "".join(b.text for b in blocks if b.kind == "text")
        out = self._base(entry) | {"choices": [choice], "usage": usage(stats)}
        if self.rest:
            out |= lmstudio_extras(entry, stats, app_state(self.request).engine)
        return out

    def _chunk(self, entry: Loaded, delta: dict[str, Any] | str, finish: str | None = None
               ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return self._base(entry) | {"object": self.chunk_object, "choices": [choice]}

    async def _stream(self, entry: Loaded, turn: Turn) -> AsyncIterator[bytes]:
        if self.chat:
            yield sse(self._chunk(entry, {"role": "assistant", "content": ""}))
        async for event in turn.stream():
            if isinstance(event, Opened | Grew):
                delta = block_delta(event)
                if delta is not None:
                    yield sse(self._chunk(entry, delta if self.chat else delta["content"]))
            elif isinstance(event, Idle):
                yield SSE_KEEPALIVE  # a call is being read
            elif isinstance(event, Finished):
                yield sse(self._final_chunk(entry, event.stats))
                if self.include_usage:
                    yield sse(self._base(entry) | {"object": self.chunk_object, "choices": [],
                                                   "usage": usage(event.stats)})
            elif isinstance(event, Failure):
                yield sse({"error": {"message": event.message, "type": "server_error"}})
        yield sse("[DONE]")

    def _final_chunk(self, entry: Loaded, stats: PredictionStats) -> dict[str, Any]:
        chunk = self._chunk(entry, {} if self.chat else "", FINISH[stats.stop_reason])
        if self.rest:
            chunk |= lmstudio_extras(entry, stats, app_state(self.request).engine)
        return chunk


def chat_message(blocks: list[Block]) -> dict[str, Any]:
    """The reply as chat's ``message``: reasoning apart (``reasoning_content``, as
    llama-server and LM Studio send it), then the text and the calls."""
    text = "".join(b.text for b in blocks if b.kind == "text")
    calls = [openai_call(b) for b in blocks if b.kind == "call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    reasoning = "".join(b.text for b in blocks if b.kind == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def openai_call(block: Block) -> dict[str, Any]:
    return {"id": block.call_id, "type": "function",
            "function": {"name": block.name, "arguments": json.dumps(block.arguments)}}


def block_delta(event: Opened | Grew) -> dict[str, Any] | None:
    """A block event as an OpenAI chat delta (the SDK accumulates tool_calls by index)."""
    block = event.block
    if block.kind == "call":
        index = block.call_index
        if isinstance(event, Opened):
            return {"tool_calls": [{"index": index, "id": block.call_id, "type": "function",
                                    "function": {"name": block.name, "arguments": ""}}]}
        return {"tool_calls": [{"index": index, "function": {"arguments": event.text}}]}
    if isinstance(event, Opened) or not event.text:
        return None
    return {"reasoning_content" if block.kind == "reasoning" else "content": event.text}


# -- handlers -------------------------------------------------------------------------------

async def chat_completions(request: Request, rest: bool = False) -> Any:
    body = await read_json(request)
    if (forwarded := await forward(request, body, "/chat/completions")) is not None:
        return forwarded
    return await complete(request, body, chat_input(body), chat=True, rest=rest)


async def completions(request: Request, rest: bool = False) -> Any:
    body = await read_json(request)
    if (forwarded := await forward(request, body, "/completions")) is not None:
        return forwarded
    prompt = body.get("prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("Field 'prompt' must be a string (or an array of one string).",
                              "prompt")
        prompt = prompt[0]
    return await complete(request, body, raw_input(prompt, body), chat=False, rest=rest)


async def complete(request: Request, body: Body, wanted: TurnInput, *, chat: bool,
                   rest: bool) -> Any:
    """Everything is checked before the model loads: a bad field shouldn't cost a load."""
    params = sampling(body)
    reply = CompletionReply(request, body, chat=chat, rest=rest)
    entry = await model_for(request, body)
    turn = await start_turn(entry, wanted, params, request=request)
    return await reply.respond(entry, turn)


async def forward(request: Request, body: Body, path: str) -> Response | None:
    """The upstream's answer when the request's model is a linked one, else None."""
    linked = app_state(request).linked
    target = linked.target(body.data.get("model"))
    if target is None:
        return None
    return await linked.forwarder.openai(request, body, target, path)


async def embeddings(request: Request) -> Any:
    body = await read_json(request)
    if (forwarded := await forward(request, body, "/embeddings")) is not None:
        return forwarded
    texts = embedding_inputs(body)
    entry = await model_for(request, body)
    vectors = await embed(entry, texts, request)
    tokens = input_tokens(texts)
    return JSONResponse({
        "object": "list", "model": entry.identifier,
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def input_tokens(texts: list[str]) -> int:
    """What embeddings report as the inputs' tokens: their words, which the engine doesn't
    count for embeddings."""
    return sum(len(t.split()) for t in texts)


def embedding_inputs(body: Body) -> list[str]:
    """Non-empty strings only: llama.cpp corrupts its memory on an empty input."""
    texts = body.get("input", (str, list), required=True)
    texts = [texts] if isinstance(texts, str) else texts
    if not texts:
        raise bad_request("Field 'input' must not be an empty array.", "input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise bad_request(f"Field 'input' holds {len(texts)} inputs; one request takes at most "
                          f"{MAX_EMBED_INPUTS}. Send them in several requests.", "input")
    for i, text in enumerate(texts):
        where = "input" if isinstance(body.data["input"], str) else f"input[{i}]"
        if not isinstance(text, str):
            raise bad_request(f"'{where}' must be a string (token arrays are not supported).",
                              where)
        if not text:
            raise bad_request(f"'{where}' must not be empty: there is nothing to embed.", where)
    chars = sum(map(len, texts))
    if chars > MAX_EMBED_CHARS:
        raise bad_request(f"Field 'input' holds {chars:,} characters; one request "
                          f"takes at most {MAX_EMBED_CHARS:,} (about 300,000 tokens). Send them "
                          "in several requests.", "input")
    return texts


async def v1_models(request: Request) -> Any:
    state = app_state(request)
    ids = list(state.models.loaded)
    ids += [m.model_key for m in state.models.downloaded() if m.model_key not in ids]
    return JSONResponse({"object": "list", "data": [
        {"id": i, "object": "model", "owned_by": "organization_owner"} for i in ids] + [
        v1_entry(m) for m in state.linked.links.reachable_models()]})


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
    state = app_state(request)
    models = state.models
    data = [v0_model(e.model, e) for e in models.loaded.values()]
    loaded_keys = {e.model.model_key for e in models.loaded.values()}
    data += [v0_model(m, None) for m in models.downloaded() if m.model_key not in loaded_keys]
    data += [v0_entry(m) for m in state.linked.links.reachable_models()]
    return JSONResponse({"object": "list", "data": data})


async def v0_model_one(request: Request) -> Any:
    state = app_state(request)
    name = request.path_params["model"]
    if (target := state.linked.target(name)) is not None:
        return JSONResponse(v0_entry(state.linked.model(target)))
    entry = state.models.find_loaded(name)
    if entry:
        return JSONResponse(v0_model(entry.model, entry))
    from lmscli import catalog

    model = catalog.find_model(name)
    if model is None:
        raise APIError(404, f'Model "{shorten(name)}" not found.', param="model",
                       code="model_not_found")
    return JSONResponse(v0_model(model, None))
