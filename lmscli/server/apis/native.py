"""lmscli's own routes: model management and server control, used by lmscli.client."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

import lmscli
from lmscli import linkstore
from lmscli.server.apis.parsing import (
    chat_input,
    load_drafting,
    manager,
    raw_input,
    read_json,
    sampling,
    speculative_mode,
)
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request
from lmscli.server.links import sdk as link_sdk
from lmscli.server.models import MAX_PARALLEL, Loaded, LoadEvent, LoadProgress
from lmscli.server.pipeline.local import predict_model, start_turn
from lmscli.server.pipeline.turns import Idle
from lmscli.server.sdk.events import SdkEvents
from lmscli.server.state import app_state
from lmscli.server.streams import (
    NDJSON_KEEPALIVE,
    ndjson,
    ndjson_answer,
    ndjson_lines,
    ndjson_stream,
)


async def root(request: Request) -> Any:
    return PlainTextResponse("lmscli is running")


async def greeting(request: Request) -> Any:
    return JSONResponse({"lmstudio": True})


async def lms_status(request: Request) -> Any:
    return JSONResponse({"package": "lmscli", "version": lmscli.__version__})


async def status(request: Request) -> Any:
    state = app_state(request)
    engine, settings = state.engine, state.settings
    return JSONResponse({
        "package": "lmscli", "version": lmscli.__version__, "pid": os.getpid(),
        "host": settings.host, "port": settings.port, "cors": settings.cors,
        "sdkPort": settings.sdk_port,
        "engine": {"name": engine.name, "version": engine.version},
        "loaded": len(manager(request).loaded),
        "promptCache": engine.prompt_cache.stats() if engine.prompt_cache else None,
    })


async def downloaded(request: Request) -> Any:
    return JSONResponse([m.model_info() for m in manager(request).downloaded()])


async def loaded(request: Request) -> Any:
    """The loaded models, then those that links serve (so "the first loaded model" stays a
    local one)."""
    state = app_state(request)
    entries = sorted(state.models.loaded.values(), key=lambda e: e.identifier)
    return JSONResponse([e.info() for e in entries] +
                        [m.info() for m in state.linked.links.linked_models()])


def gpu_ratio(body: Body) -> float | None:
    gpu = body.get("gpu", (str, float))
    if gpu is None:
        return None
    if gpu == "off":
        return 0.0
    if gpu == "max":
        return 1.0
    if isinstance(gpu, str) or not 0 <= gpu <= 1:
        raise bad_request("Field 'gpu' must be \"off\", \"max\" or a number between 0 and 1.",
                          "gpu")
    return float(gpu)


async def load(request: Request) -> Any:
    """Loads a model, streaming NDJSON progress lines, then a success or error line."""
    body = await read_json(request)
    name = body.get("model", str, required=True)
    linked = app_state(request).linked
    if (target := linked.target(name)) is not None:
        return link_sdk.load_answer(linked.model(target))  # the engine already holds it
    identifier = body.get("identifier", str)
    context_length = body.integer("context_length", low=1)
    ttl = body.integer("ttl", low=1)
    parallel = body.integer("parallel", low=1, high=MAX_PARALLEL)
    speculative = speculative_mode(body)
    ratio = gpu_ratio(body)
    drafting = load_drafting(body)
    models = manager(request)
    if body.get("get_or_load", bool, False) and (entry := models.find_loaded(name)):
        entry.touch()
        line = {"type": "success", "info": entry.info(), "alreadyLoaded": True}
        return ndjson_answer(line)
    # what can be refused before loading is a plain 4xx, not a line in the stream
    await models.check_load(name, identifier, context_length)
    events = models.load_events(name, identifier=identifier, context_length=context_length,
                                gpu_ratio=ratio, ttl_s=float(ttl) if ttl else None,
                                parallel=parallel, speculative=speculative, **drafting)
    return ndjson_lines(load_lines(name, events))


async def load_lines(name: str, events: AsyncGenerator[LoadEvent, None]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            if isinstance(event, LoadProgress):
                yield ndjson({"type": "progress", "progress": event.progress})
            else:
                yield ndjson({"type": "success", "info": event.entry.info(),
                              "loadTimeSec": event.seconds})
    except APIError as exc:
        yield ndjson({"type": "error", "status": exc.status} | exc.body())
    except Exception as exc:  # a failed load must reach the client as a message
        yield ndjson({"type": "error", "status": 500,
                      "error": {"message": f"Failed to load {name}: {exc}",
                                "type": "server_error", "param": None,
                                "code": "model_load_failed"}})
    finally:
        await events.aclose()  # the client went away: abort the load between tensors


async def unload(request: Request) -> Any:
    body = await read_json(request)
    models = manager(request)
    if body.get("all", bool, False):
        return JSONResponse({"unloaded": await models.unload_all()})
    identifier = body.get("identifier", str, required=True)
    app_state(request).linked.check_unload(identifier)
    entry: Loaded = await models.unload(identifier)
    return JSONResponse({"identifier": entry.identifier})


async def shutdown(request: Request) -> Any:
    server = app_state(request).uvicorn_server
    if server is None:
        raise APIError(409, "This server was not started by lmscli and cannot stop itself.")
    server.should_exit = True
    return JSONResponse({"stopping": True})


# -- predictions for lmscli.client ---------------------------------------------------------

async def predict(request: Request) -> Any:
    """One prediction as NDJSON events shaped like LM Studio's predict channel: ``started``,
    ``promptProcessingProgress``, ``fragment``, ``toolCallGeneration*``, then ``success``
    or ``error``."""
    body = await read_json(request)
    state = app_state(request)
    predictions = state.predictions
    if (target := state.linked.target(body.data.get("model"))) is not None:
        return await link_sdk.predict(request, body, target, state.linked.model(target),
                                      state.linked.forwarder, predictions)
    params = sampling(body)  # before a load: a bad number shouldn't cost one
    wanted = raw_input(body.get("prompt", str, required=True), body) \
        if "prompt" in body.data else chat_input(body)
    entry = await predict_model(request, body)
    turn = await start_turn(entry, wanted, params)
    prediction_id = secrets.token_hex(8)
    predictions[prediction_id] = turn
    events = SdkEvents(entry.info, mark_recovered=True)

    async def lines() -> AsyncIterator[bytes]:
        yield ndjson({"type": "started", "predictionId": prediction_id,
                      "modelInfo": entry.info()})
        async for event in turn.stream(coalesce_s=0.0):
            if isinstance(event, Idle):
                yield NDJSON_KEEPALIVE  # a call is being read
            for out in events.convert(event):
                yield ndjson(out)

    async def on_close() -> None:
        predictions.pop(prediction_id, None)
        await turn.close()

    return ndjson_stream(lines(), on_close)


async def cancel(request: Request) -> Any:
    """Stop a prediction between tokens; its stream still ends with ``success`` (userStopped)."""
    prediction = app_state(request).predictions.get(request.path_params["prediction_id"])
    if prediction is None:
        raise APIError(404, "No such prediction is running.", code="prediction_not_found")
    prediction.cancel()
    return JSONResponse({"cancelled": True})


# -- `lms link` ---------------------------------------------------------------------------------

async def list_links(request: Request) -> Any:
    """The links; ``?refresh=true`` asks each for its models first (a few seconds at most)."""
    registry = app_state(request).linked.links
    if request.query_params.get("refresh", "").lower() in ("1", "true", "yes"):
        await registry.refresh()
    return JSONResponse({"links": [link.info() for link in registry.links.values()]})


async def add_link(request: Request) -> Any:
    body = await read_json(request)
    name = body.text("name", required=True)
    url = body.text("url", required=True)
    key = body.text("api_key")
    config = linkstore.LinkConfig(checked(linkstore.check_name, name, "name"),
                                  checked(linkstore.normalise_url, url, "url"), key or None)
    registry = app_state(request).linked.links
    link = registry.add(config)
    await registry.refresh([link.name])
    return JSONResponse({"link": link.info()})


def checked(check: Callable[[str], str], value: str, param: str) -> str:
    try:
        return check(value)
    except linkstore.LinkConfigError as exc:
        raise bad_request(str(exc), param, "invalid_link") from None


async def remove_link(request: Request) -> Any:
    body = await read_json(request)
    link = app_state(request).linked.links.remove(body.text("name", required=True))
    return JSONResponse({"removed": link.name})
