"""Linked models on the SDK's websocket (``lms.llm("link/model").respond(...)`` with the
official ``lmstudio`` package): the ``llm`` namespace's handlers are wrapped, as
``link_routes.Linked.wrap`` wraps the HTTP routes, so that a model a link serves is "already
loaded" and its predictions go to the upstream through the Forwarder (``link_sdk``), while
every other model reaches the local handler unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from lmscli.server.errors import Body
from lmscli.server.link_sdk import open_prediction, sdk_payload
from lmscli.server.links import LinkedModel, Target
from lmscli.server.sdk.kvconfig import PredictionConfig
from lmscli.server.sdk.models_ns import MIN_UNKNOWN_CONTEXT
from lmscli.server.sdk.predict_ch import request_config
from lmscli.server.sdk.protocol import Channel, Context

Rpc = Callable[[Context, Any], Awaitable[Any]]
ChannelHandler = Callable[[Context, Channel, Any], Awaitable[None]]


def linked_of(ctx: Context, name: Any) -> tuple[Target, LinkedModel] | None:
    """The link target and model for ``name``, or None for a local model (or no name)."""
    linked = getattr(ctx.state, "linked", None)
    if linked is None or not isinstance(name, str) or not name:
        return None
    target = linked.links.resolve(name)
    return (target, linked.links.linked_model(target)) if target is not None else None


def specifier_name(specifier: Any) -> Any:
    """The name a ModelSpecifier gives (an instance reference or a query's identifier)."""
    if not isinstance(specifier, dict):
        return None
    if specifier.get("type") == "instanceReference":
        return specifier.get("instanceReference")
    query = specifier.get("query")
    return (query.get("identifier") or query.get("path")) if isinstance(query, dict) else None


def sdk_info(model: LinkedModel) -> dict[str, Any]:
    """The instance info as the SDK parses it: every number there (an upstream may not say
    its context length), and a format it knows."""
    info = model.info()
    info["format"] = "gguf"  # the SDK knows gguf, safetensors and mlx only; a guess is better
    info["maxContextLength"] = info["maxContextLength"] or MIN_UNKNOWN_CONTEXT
    info["contextLength"] = info["contextLength"] or info["maxContextLength"]
    return info


# -- wrapping the llm namespace --------------------------------------------------------------

def wrap(rpc: dict[str, Rpc], channels: dict[str, ChannelHandler]) -> None:
    """Put the linked-aware handlers in place of the local ones, in place."""
    rpc["getModelInfo"] = _model_info(rpc["getModelInfo"])
    rpc["getLoadConfig"] = _load_config(rpc["getLoadConfig"])
    channels["getOrLoad"] = _get_or_load(channels["getOrLoad"])
    channels["predict"] = _predict(channels["predict"])


def _model_info(handler: Rpc) -> Rpc:
    async def wrapped(ctx: Context, parameter: Any) -> Any:
        spec = parameter.get("specifier") if isinstance(parameter, dict) else None
        found = linked_of(ctx, specifier_name(spec))
        return await handler(ctx, parameter) if found is None else sdk_info(found[1])

    return wrapped


def _load_config(handler: Rpc) -> Rpc:
    async def wrapped(ctx: Context, parameter: Any) -> Any:
        spec = parameter.get("specifier") if isinstance(parameter, dict) else None
        found = linked_of(ctx, specifier_name(spec))
        if found is None:
            return await handler(ctx, parameter)
        # the upstream's load settings are its own; the context length is what it told us
        return {"fields": [{"key": "llm.load.contextLength",
                            "value": sdk_info(found[1])["contextLength"]}]}

    return wrapped


def _get_or_load(handler: ChannelHandler) -> ChannelHandler:
    async def wrapped(ctx: Context, channel: Channel, parameter: Any) -> None:
        name = parameter.get("identifier") if isinstance(parameter, dict) else None
        found = linked_of(ctx, name)
        if found is None:
            await handler(ctx, channel, parameter)
            return
        # the upstream already holds the model: nothing loads here
        await channel.send({"type": "alreadyLoaded", "info": sdk_info(found[1])})

    return wrapped


def _predict(handler: ChannelHandler) -> ChannelHandler:
    async def wrapped(ctx: Context, channel: Channel, parameter: Any) -> None:
        spec = parameter.get("modelSpecifier") if isinstance(parameter, dict) else None
        found = linked_of(ctx, specifier_name(spec))
        if found is None:
            await handler(ctx, channel, parameter)
            return
        await predict(ctx, channel, request_config(parameter, "predictionConfigStack"),
                      *found)

    return wrapped


# -- a linked prediction ---------------------------------------------------------------------

def upstream_payload(config: PredictionConfig, target: Target) -> dict[str, Any]:
    """The SDK's prediction as an OpenAI request: ``complete()`` as a text completion."""
    payload = sdk_payload(Body(config.body), target)
    if config.raw_prompt:  # the SDK's completion template joins the contents, nothing else
        payload["prompt"] = "".join(str(m.get("content") or "")
                                    for m in payload.pop("messages"))
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        fmt["json_schema"].setdefault("name", "response")  # OpenAI servers require one
    return payload


async def predict(ctx: Context, channel: Channel, config: PredictionConfig, target: Target,
                  model: LinkedModel) -> None:
    forwarder = ctx.state.linked.forwarder
    prediction = await open_prediction(forwarder, target, model,
                                       upstream_payload(config, target))
    channel.on_cancel(prediction.cancel)  # ends it with userStopped, as a local one ends
    # the client needs all four keys of a success; the upstream's settings are its own
    extra = {"modelInfo": sdk_info(model), "loadModelConfig": {"fields": []},
             "predictionConfig": {"fields": config.echo}}
    messages = prediction.messages()
    try:
        async for message in messages:
            if message["type"] == "success":
                message.update(extra)
            await channel.send(message)
    finally:
        # the connection closed mid-answer: closing the upstream stops its generation
        with contextlib.suppress(Exception):
            await messages.aclose()
        await prediction.close()
