"""Ollama's API (``/api/*`` beside LM Studio's ``/api/v0`` and ``/api/v1``), so that tools
built for Ollama (its Python and JavaScript clients, editors, Open WebUI) work unchanged.

Chat and generate are one more renderer of the pipeline's turn events (NDJSON lines, or one
object), on the same models, links, slots and prompt cache as every other API. Names come as
Ollama clients send them (``name:tag``, ``:latest``) and resolve to lmscli keys by ``lms load``'s
rules (``names.py``). Errors are Ollama's ``{"error": "…"}`` (the route's surface in ``app.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmscli import catalog
from lmscli.engine import PredictionStats, SamplingParams
from lmscli.prompting.grammar import any_json_grammar
from lmscli.server.apis import ollama_names as names
from lmscli.server.apis.api_v1_downloads import downloads
from lmscli.server.apis.openai_api import embedding_inputs, input_tokens
from lmscli.server.apis.parsing import (
    DRAFT_FIELDS,
    manager,
    parse_messages,
    read_json,
    sampling,
    schema_grammar,
)
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request
from lmscli.server.models import LoadDone, Loaded
from lmscli.server.pipeline.local import start_turn
from lmscli.server.pipeline.running import embed
from lmscli.server.pipeline.tooluse import parse_tools
from lmscli.server.pipeline.turns import (
    AnyTurn,
    Block,
    Closed,
    Failure,
    Finished,
    Grew,
    TurnInput,
)
from lmscli.server.state import app_state
from lmscli.server.streams import ndjson, ndjson_lines, ndjson_stream

log = logging.getLogger("lmscli.server")

# The Ollama release whose API this follows: clients check it before using newer fields
# (think, tools, JSON-schema format, /api/embed).
VERSION = "0.12.0"
# what Ollama reports for a model kept loaded forever (keep_alive -1)
FOREVER = datetime(2318, 1, 1, tzinfo=timezone.utc)
# sampling options Ollama clients send that map onto the engine's, and lmscli's own
# speculative decoding (runner options, so they sit with them); the rest (num_gpu,
# num_thread, mirostat, …) are ignored, as Ollama ignores options a runner lacks
OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
           "presence_penalty", "frequency_penalty", "stop", "num_predict", "speculative",
           *DRAFT_FIELDS)
DONE_REASON = {"maxPredictedTokensReached": "length", "contextLengthReached": "length"}
PULL_POLL_S = 0.25


def now_iso(t: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


# -- what the model listings say --------------------------------------------------------------

def digest(model: Any) -> str:
    """Names the file's version (path, size, time), not a hash of its gigabytes: hashing
    each model on every listing would take minutes."""
    stat = model.abs_path.stat()
    key = f"{model.abs_path}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()


def details(model: Any) -> dict[str, Any]:
    family = model.architecture or ""
    return {"parent_model": "", "format": "gguf", "family": family,
            "families": [family] if family else None,
            "parameter_size": model.params_string or "",
            "quantization_level": model.quantization or ""}


def linked_details() -> dict[str, Any]:
    return {"parent_model": "", "format": "linked", "family": "", "families": None,
            "parameter_size": "", "quantization_level": ""}


def tag_entry(model: Any) -> dict[str, Any]:
    name = names.listed(model.model_key)
    return {"name": name, "model": name,
            "modified_at": now_iso(model.abs_path.stat().st_mtime),
            "size": model.size_bytes, "digest": digest(model), "details": details(model)}


def linked_tag_entry(key: str) -> dict[str, Any]:
    name = names.listed(key)
    return {"name": name, "model": name, "modified_at": now_iso(), "size": 0,
            "digest": hashlib.sha256(key.encode()).hexdigest(), "details": linked_details()}


def ps_entry(entry: Loaded) -> dict[str, Any]:
    name = names.listed(entry.identifier)
    remaining = entry.ttl_remaining()
    expires = FOREVER if remaining is None else datetime.fromtimestamp(
        time.time() + remaining, timezone.utc)
    return {"name": name, "model": name, "size": entry.model.size_bytes,
            "digest": digest(entry.model), "details": details(entry.model),
            "expires_at": expires.isoformat().replace("+00:00", "Z"), "size_vram": 0,
            "context_length": entry.instance.context_length}


def capabilities(model: Any) -> list[str]:
    if model.type == "embedding":
        return ["embedding"]
    out = ["completion"]
    if model.trained_for_tool_use:
        out.append("tools")
    if "<think>" in (model.chat_template or ""):
        out.append("thinking")
    return out


def model_info(model: Any) -> dict[str, Any]:
    """The GGUF's metadata, scalars only (Ollama leaves the vocabulary's arrays out too)."""
    meta = catalog.read_gguf_metadata(model.abs_path)
    info = {key: value for key, value in meta.kv.items()
            if isinstance(value, str | int | float | bool) and key != "tokenizer.chat_template"}
    if meta.parameter_count:
        info["general.parameter_count"] = meta.parameter_count
    return info


# -- listing routes ---------------------------------------------------------------------------

async def version(request: Request) -> Response:
    return JSONResponse({"version": VERSION})


async def tags(request: Request) -> Response:
    state = app_state(request)
    models = [tag_entry(m) for m in await asyncio.to_thread(state.models.downloaded)]
    models += [linked_tag_entry(m.key) for m in state.linked.links.reachable_models()]
    return JSONResponse({"models": models})


async def ps(request: Request) -> Response:
    entries = sorted(manager(request).loaded.values(), key=lambda e: e.loaded_at)
    return JSONResponse({"models": [ps_entry(e) for e in entries]})


async def show(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    state = app_state(request)
    if names.linked(state.linked, name) is not None:
        return JSONResponse({"license": "", "modelfile": "", "parameters": "", "template": "",
                             "details": linked_details(), "model_info": {},
                             "capabilities": ["completion"], "modified_at": now_iso()})
    model = names.local_model(state.models, name)
    info = await asyncio.to_thread(model_info, model)
    template = model.chat_template or ""
    return JSONResponse({
        "license": "", "modelfile": f'FROM {model.abs_path}\nTEMPLATE """{template}"""\n',
        "parameters": "", "template": template, "details": details(model),
        "model_info": info, "capabilities": capabilities(model),
        "modified_at": now_iso(model.abs_path.stat().st_mtime)})


def model_name(body: Body) -> str:
    """``model``, or ``name`` as older clients send it."""
    name = body.text("model", max_chars=1000) or body.text("name", max_chars=1000)
    if not name:
        raise bad_request("model is required", "model")
    return name


# -- keep_alive -------------------------------------------------------------------------------

MAX_KEEP_S = 10 * 365 * 86400  # longer is for ever
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                  "h": 3600.0}


def keep_alive(body: Body) -> float | None:
    """Seconds to keep the model loaded after this request (negative: for ever), or None
    when the request doesn't say. Numbers are seconds; strings are Go durations ("5m",
    "1h30m", "-1") or numbers."""
    value = body.get("keep_alive", (str, float))
    if value is None:
        return None
    if isinstance(value, str):
        try:
            seconds: float | None = float(value)
        except ValueError:
            seconds = parse_duration(value)
    else:
        seconds = body.number("keep_alive")
    if seconds is None or not math.isfinite(seconds):
        raise bad_request(f"invalid keep_alive duration {str(value)[:40]!r}: use seconds or "
                          'a duration such as "5m" or "1h".', "keep_alive")
    return -1.0 if seconds > MAX_KEEP_S else seconds


def parse_duration(text: str) -> float | None:
    """A Go duration ("1h30m", "-1s", "300ms") in seconds; None if it isn't one."""
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    total, number = 0.0, ""
    i = 0
    if not rest:
        return None
    while i < len(rest):
        if rest[i].isdigit() or rest[i] == ".":
            number += rest[i]
            i += 1
            continue
        unit = next((u for u in sorted(DURATION_UNITS, key=len, reverse=True)
                     if rest.startswith(u, i)), None)
        if unit is None or not number:
            return None
        try:
            total += float(number) * DURATION_UNITS[unit]
        except ValueError:
            return None
        number, i = "", i + len(unit)
    return None if number else sign * total


def keep(entry: Loaded, seconds: float | None) -> None:
    """keep_alive as the model's idle TTL (0 is handled when the request ends)."""
    if seconds is None or seconds == 0:
        return
    entry.ttl_s = None if seconds < 0 else seconds
    entry.touch()


async def release(request: Request, entry: Loaded, seconds: float | None) -> bool:
    """keep_alive 0: unload now if nothing else uses the model, else once it is idle.
    Whether it unloaded."""
    if seconds != 0:
        return False
    if entry.active > 0:
        entry.ttl_s = 0.0  # the reaper takes it when its last request ends
        return False
    with contextlib.suppress(APIError):  # unloaded meanwhile
        await manager(request).unload(entry.identifier)
    return True


# -- the model a request names, loaded ------------------------------------------------------

async def loaded_model(request: Request, name: str, seconds: float | None,
                       context_length: int | None) -> tuple[Loaded, float]:
    """The local model ``name`` resolves to, loaded just in time (with ``num_ctx``) and
    kept for ``seconds`` (keep_alive), and how long its load took."""
    models = manager(request)
    key = names.local_key(models, name)
    ttl = seconds if seconds is not None and seconds > 0 else None
    entry, load_s = None, 0.0
    async with contextlib.aclosing(models.get_or_load_events(
            key, ttl_s=ttl, context_length=context_length)) as events:
        async for event in events:
            if isinstance(event, LoadDone):
                entry, load_s = event.entry, event.seconds or 0.0
    assert entry is not None
    keep(entry, seconds)
    return entry, load_s


# -- chat and generate ------------------------------------------------------------------------

def options(body: Body) -> tuple[SamplingParams, int | None]:
    """Ollama's ``options`` as sampling parameters, and ``num_ctx``."""
    raw = body.get("options", dict, {})
    flat = {key: raw[key] for key in OPTIONS if key in raw}
    params = sampling(Body(flat, "options"), limit_key="num_predict")
    return params, Body(raw, "options").integer("num_ctx", low=1, high=2**31 - 1)


def format_grammar(body: Body) -> str | None:
    """``format``: "json", a JSON schema, or nothing."""
    fmt = body.get("format", (str, dict))
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return any_json_grammar()
    if isinstance(fmt, str):
        raise bad_request('format must be "json" or a JSON schema.', "format")
    return schema_grammar(fmt, "format")


def think_setting(body: Body) -> bool | None:
    """``think``: a boolean, or an effort ("low", "medium", "high") that means on."""
    value = body.get("think", (bool, str))
    if isinstance(value, str):
        if value not in ("low", "medium", "high"):
            raise bad_request('think must be true, false, "low", "medium" or "high".',
                              "think")
        return True
    return value


def no_images(raw: Any, where: str) -> None:
    if raw not in (None, []):
        raise bad_request(f"{where}: images are not supported: lmscli's models read text "
                          "only.", where)


def chat_messages(body: Body) -> list[dict[str, Any]]:
    """Ollama's messages in OpenAI's chat shape. Ollama's calls carry no ids: each call gets
    one, and a tool result answers the earliest open call of its ``tool_name`` (else the
    earliest open one)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    serial = 0  # calls seen so far, for their ids
    for i, raw in enumerate(body.get("messages", list, [])):
        msg = Body(raw, f"messages[{i}]")
        no_images(raw.get("images"), f"messages[{i}].images")
        message = {"role": msg.get("role", str, required=True),
                   "content": msg.get("content", str, "")}
        if message["role"] == "assistant" and raw.get("tool_calls"):
            message["tool_calls"] = calls_in(msg, i, serial)
            serial += len(message["tool_calls"])
            open_calls += [(c["id"], c["function"]["name"]) for c in message["tool_calls"]]
        if message["role"] == "tool":
            message["tool_call_id"] = answered(open_calls, msg.get("tool_name", str))
        out.append(message)
    return out


def calls_in(msg: Body, i: int, serial: int) -> list[dict[str, Any]]:
    calls = msg.get("tool_calls", list, [])
    out = []
    for j, raw in enumerate(calls):
        call = Body(raw, f"messages[{i}].tool_calls[{j}]")
        fn = call.get("function", dict, required=True)
        out.append({"id": call.get("id", str) or f"call_{serial + j}", "type": "function",
                    "function": fn})
    return out


def answered(open_calls: list[tuple[str, str]], name: str | None) -> str | None:
    for k, (call_id, call_name) in enumerate(open_calls):
        if name is None or call_name == name:
            del open_calls[k]
            return call_id
    return None


def chat_input(body: Body) -> TurnInput | None:
    """The turn a chat asks for; None for no messages (Ollama's way to load a model)."""
    messages = chat_messages(body)
    if not messages:
        return None
    openai = Body({"messages": messages, "tools": body.data.get("tools")})
    return TurnInput(parse_messages(openai), parse_tools(openai), None,
                     format_grammar(body), "format")


def generate_input(body: Body) -> TurnInput | None:
    """The turn a generate asks for: the prompt through the chat template (with
    ``system``), or as it is with ``raw``; None for an empty prompt (a load)."""
    for key, what in (("suffix", "fill-in-the-middle (suffix)"),
                      ("template", "a custom template")):
        if body.text(key):
            raise bad_request(f"{what} is not supported: leave '{key}' out.", key)
    if body.get("context", list):
        raise bad_request("'context' (token ids of an earlier answer) is not supported: "
                          "send the conversation to /api/chat instead.", "context")
    no_images(body.data.get("images"), "images")
    prompt = body.text("prompt", "")
    grammar = format_grammar(body)
    if not prompt:
        return None
    if body.get("raw", bool, False):
        return TurnInput([], schema_grammar=grammar, schema_param="format", prompt=prompt)
    system = body.text("system")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    return TurnInput(messages, schema_grammar=grammar, schema_param="format")


async def chat(request: Request) -> Response:
    return await predict(request, chat_input, chat=True)


async def generate(request: Request) -> Response:
    return await predict(request, generate_input, chat=False)


async def predict(request: Request, parse: Callable[[Body], TurnInput | None], *,
                  chat: bool) -> Response:
    """Everything is checked before a load: a bad field shouldn't cost one."""
    started = time.perf_counter()
    body = await read_json(request)
    name = body.text("model", required=True, nonempty=True, max_chars=1000)
    assert name is not None
    stream = body.get("stream", bool, True)
    wanted = parse(body)
    params, num_ctx = options(body)
    reply = Reply(request, name, chat=chat, think=think_setting(body), started=started)
    seconds = keep_alive(body)
    linked = names.linked(app_state(request).linked, name)
    if linked is not None:
        if wanted is None:
            return JSONResponse(reply.loaded("load"))
        turn = await app_state(request).linked.open_turn(request, linked, wanted, params)
        assert turn is not None
        reply.turn = turn[1]
    else:
        entry, reply.load_s = await loaded_model(request, name, seconds, num_ctx)
        if wanted is None:  # a load (or, with keep_alive 0, an unload)
            unloaded = await release(request, entry, seconds)
            return JSONResponse(reply.loaded("unload" if unloaded else "load"))
        reply.turn = await start_turn(entry, wanted, params, request=request)
        reply.after = lambda: release(request, entry, seconds)
    if stream:
        return ndjson_stream(reply.lines(), reply.close)
    try:
        return JSONResponse(await reply.whole())
    finally:
        await reply.close()


class Reply:
    """One chat or generate answer: NDJSON lines as the reply grows, or one object."""

    def __init__(self, request: Request, name: str, *, chat: bool, think: bool | None,
                 started: float) -> None:
        self.request, self.name, self.chat, self.think = request, name, chat, think
        self.started = started
        self.load_s = 0.0
        self.turn: AnyTurn | None = None
        self.after: Any = None  # what runs when the answer is over (keep_alive 0)

    def _base(self) -> dict[str, Any]:
        return {"model": self.name, "created_at": now_iso()}

    def _piece(self, text: str = "", thinking: str = "",
               calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if not self.chat:
            out = self._base() | {"response": text}
            return out | ({"thinking": thinking} if thinking else {})
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        return self._base() | {"message": message}

    def loaded(self, reason: str) -> dict[str, Any]:
        return self._piece() | {"done": True, "done_reason": reason}

    def _final(self, stats: PredictionStats, piece: dict[str, Any]) -> dict[str, Any]:
        ttft = stats.time_to_first_token_s or 0.0
        return piece | {
            "done": True, "done_reason": DONE_REASON.get(stats.stop_reason, "stop"),
            "total_duration": ns(time.perf_counter() - self.started),
            "load_duration": ns(self.load_s),
            "prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": ns(ttft),
            "eval_count": stats.predicted_tokens,
            "eval_duration": ns(max(0.0, stats.total_time_s - ttft))}

    async def whole(self) -> dict[str, Any]:
        assert self.turn is not None
        finished = await self.turn.whole()
        blocks = self.turn.blocks.all
        text = "".join(b.text for b in blocks if b.kind == "text")
        thinking = "".join(b.text for b in blocks if b.kind == "reasoning")
        calls = [tool_call(b) for b in blocks if b.kind == "call"]
        return self._final(finished.stats, self._piece(
            text, thinking if self.think is not False else "", calls))

    async def lines(self) -> AsyncIterator[bytes]:
        assert self.turn is not None
        async for event in self.turn.stream():
            if isinstance(event, Grew) and event.block.kind == "text" and event.text:
                yield ndjson(self._piece(event.text) | {"done": False})
            elif isinstance(event, Grew) and event.block.kind == "reasoning" \
                    and self.think is not False and event.text:
                yield ndjson(self._piece(thinking=event.text) | {"done": False})
            elif isinstance(event, Closed) and event.block.kind == "call":
                # Ollama sends each call whole
                yield ndjson(self._piece(calls=[tool_call(event.block)]) | {"done": False})
            elif isinstance(event, Finished):
                yield ndjson(self._final(event.stats, self._piece()))
            elif isinstance(event, Failure):
                yield ndjson({"error": f"Prediction failed: {event.message}"})

    async def close(self) -> None:
        if self.turn is not None:
            await self.turn.close()
        after, self.after = self.after, None
        if after is not None:
            await after()


def tool_call(block: Block) -> dict[str, Any]:
    return {"id": block.call_id,
            "function": {"index": block.call_index, "name": block.name,
                         "arguments": block.arguments}}


# -- embeddings -------------------------------------------------------------------------------

async def embed_route(request: Request) -> Response:
    """``/api/embed``: one unit vector per input."""
    started = time.perf_counter()
    body = await read_json(request)
    name = body.text("model", required=True, nonempty=True, max_chars=1000)
    assert name is not None
    texts = embedding_inputs(body)
    body.get("truncate", bool)
    dimensions = body.integer("dimensions", low=1)
    seconds = keep_alive(body)
    entry, load_s = await embedding_model(request, name, seconds)
    vectors = await embed(entry, texts, request)
    if dimensions is not None and dimensions != len(vectors[0]):
        raise bad_request(f"{name} makes vectors of {len(vectors[0])} dimensions; "
                          "leave 'dimensions' out.", "dimensions")
    await release(request, entry, seconds)
    return JSONResponse({"model": name, "embeddings": vectors,
                         "total_duration": ns(time.perf_counter() - started),
                         "load_duration": ns(load_s),
                         "prompt_eval_count": input_tokens(texts)})


async def embeddings(request: Request) -> Response:
    """``/api/embeddings``, the older route: one ``prompt``, one ``embedding``."""
    body = await read_json(request)
    name = body.text("model", required=True, nonempty=True, max_chars=1000)
    assert name is not None
    prompt = body.text("prompt", "")
    seconds = keep_alive(body)
    entry, _ = await embedding_model(request, name, seconds)
    vector = (await embed(entry, [prompt], request))[0] if prompt else []
    await release(request, entry, seconds)
    return JSONResponse({"embedding": vector})


async def embedding_model(request: Request, name: str, seconds: float | None
                          ) -> tuple[Loaded, float]:
    if names.linked(app_state(request).linked, name) is not None:
        raise bad_request(f"{name} is served by a linked engine: ask /v1/embeddings for its "
                          "embeddings.", "model")
    return await loaded_model(request, name, seconds, None)


# -- pull and delete --------------------------------------------------------------------------

async def pull(request: Request) -> Response:
    """``lms get`` with Ollama's status lines; a download already under way is joined."""
    body = await read_json(request)
    target = names.pull_target(model_name(body))
    body.get("insecure", bool)
    job = await downloads(request).start(target)
    if not body.get("stream", bool, True):
        while job.status == "downloading":
            await asyncio.sleep(PULL_POLL_S)
        if job.status == "failed":
            raise APIError(502, job.error or "the download failed", type_="server_error")
        return JSONResponse({"status": "success"})
    return ndjson_lines(pull_lines(job))  # a pull goes on when its client leaves


async def pull_lines(job: Any) -> AsyncIterator[bytes]:
    yield ndjson({"status": "pulling manifest"})
    layer = hashlib.sha256(job.target.encode()).hexdigest()
    last = -1
    while True:
        if job.total and job.done != last:
            last = job.done
            yield ndjson({"status": f"pulling {layer[:12]}", "digest": f"sha256:{layer}",
                          "total": job.total, "completed": job.done})
        if job.status != "downloading":
            break
        await asyncio.sleep(PULL_POLL_S)
    if job.status == "failed":
        yield ndjson({"error": job.error or "the download failed"})
        return
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield ndjson({"status": status})


async def delete(request: Request) -> Response:
    body = await read_json(request)
    name = model_name(body)
    model = names.exact_model(name)
    models = manager(request)
    for entry in [e for e in models.loaded.values() if e.model.abs_path == model.abs_path]:
        await models.unload(entry.identifier)
    await asyncio.to_thread(catalog.remove_model, model)
    log.info("Deleted %s (%s)", model.model_key, model.path)
    return Response(status_code=200)
