"""The ``llm`` and ``embedding`` namespaces' model endpoints: listing, info, load, unload.

A model answers in the namespace of its kind; lmscli embeds with chat models too (as
``/v1/embeddings`` does), so the ``embedding`` namespace also takes any loaded model by
name and presents it as an embedding model there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from lmscli.server.body import Body
from lmscli.server.errors import shorten
from lmscli.server.links.registry import LinkedModel, LinkTarget
from lmscli.server.models import JitEvent, Loaded, LoadProgress, LoadStart
from lmscli.server.pipeline.running import embed
from lmscli.server.sdk.errors import DOMAIN_MISMATCH, NO_MODEL, SdkError
from lmscli.server.sdk.kvconfig import collapse, load_config, load_fields
from lmscli.server.sdk.protocol import Channel, Context

MIN_UNKNOWN_CONTEXT = 4096  # maxContextLength for a model whose file doesn't say


def listing_info(model: Any) -> dict[str, Any]:
    """A downloaded model's ModelInfo; the SDK needs every number to be there."""
    info = model.model_info()
    info["maxContextLength"] = info.get("maxContextLength") or MIN_UNKNOWN_CONTEXT
    return info


def instance_info(entry: Loaded, domain: str) -> dict[str, Any]:
    info = entry.info()
    info["type"] = domain
    info["maxContextLength"] = info.get("maxContextLength") or entry.instance.context_length
    return info


# -- models that links serve (the official SDK reaches them by name, as local ones) ----------

def linked_of(ctx: Context, name: Any) -> tuple[LinkTarget, LinkedModel] | None:
    """The link target and model for ``name`` in the ``llm`` namespace, or None for a local
    model (or no name)."""
    if ctx.namespace != "llm":
        return None
    target = ctx.state.linked.target(name)
    return (target, ctx.state.linked.model(target)) if target is not None else None


def specifier_name(specifier: Any) -> Any:
    """The name a ModelSpecifier gives (an instance reference or a query's identifier)."""
    if not isinstance(specifier, dict):
        return None
    if specifier.get("type") == "instanceReference":
        return specifier.get("instanceReference")
    query = specifier.get("query")
    return (query.get("identifier") or query.get("path")) if isinstance(query, dict) else None


def linked_info(model: LinkedModel) -> dict[str, Any]:
    """A linked model's instance info as the SDK parses it: every number there (an upstream
    may not say its context length), and a format it knows."""
    info = model.info()
    info["format"] = "gguf"  # the SDK knows gguf, safetensors and mlx only; a guess is better
    info["maxContextLength"] = info["maxContextLength"] or MIN_UNKNOWN_CONTEXT
    info["contextLength"] = info["contextLength"] or info["maxContextLength"]
    return info


def _linked_by_specifier(ctx: Context, parameter: Any) -> LinkedModel | None:
    spec = parameter.get("specifier") if isinstance(parameter, dict) else None
    found = linked_of(ctx, specifier_name(spec))
    return found[1] if found is not None else None


# -- local models ------------------------------------------------------------------------------

def loaded_in(ctx: Context) -> list[Loaded]:
    """The loaded models of this namespace's kind, oldest first (``lms.llm()`` takes [0])."""
    entries = sorted(ctx.models.loaded.values(), key=lambda e: e.loaded_at)
    return [e for e in entries if e.model.type == ctx.namespace]


def find_instance(ctx: Context, specifier: Any, where: str = "specifier") -> Loaded:
    """The loaded model a ModelSpecifier names: a query (identifier / path, or nothing for
    the first loaded model) or an instance reference."""
    spec = Body(specifier, where)
    kind = spec.get("type", str, required=True)
    if kind == "instanceReference":
        name = spec.get("instanceReference", str, required=True)
    elif kind == "query":
        query = Body(spec.get("query", dict, {}), f"{where}.query")
        name = query.get("identifier", str) or query.get("path", str)
    else:
        raise SdkError(f"'{where}.type' must be query or instanceReference.")
    if not name:
        loaded = loaded_in(ctx)
        if not loaded:
            raise SdkError(f"No {ctx.namespace} model is loaded.", code=NO_MODEL)
        return loaded[0]
    entry = ctx.models.find_loaded(name)
    if entry is None:
        loaded = ", ".join(e.identifier for e in loaded_in(ctx)) or "none"
        raise SdkError(f'No loaded model matches "{shorten(name)}" (loaded: {loaded}). Load '
                       f'it first, for example with lms.llm("{shorten(name)}") or '
                       f"lms load {shorten(name)}.", code=NO_MODEL)
    check_domain(entry, ctx.namespace)
    entry.touch()
    return entry


def check_domain(entry: Loaded, domain: str) -> None:
    check_model_domain(entry.model, domain)


def check_model_domain(model: Any, domain: str) -> None:
    if domain == "llm" and model.type != "llm":
        raise SdkError(f'"{model.model_key}" is an embedding model: it cannot be used as an '
                       "LLM.", code=DOMAIN_MISMATCH)


# -- RPCs -----------------------------------------------------------------------------------

async def list_loaded(ctx: Context, _: Any) -> list[dict[str, Any]]:
    return [instance_info(e, ctx.namespace) for e in loaded_in(ctx)]


async def get_model_info(ctx: Context, parameter: Any) -> dict[str, Any] | None:
    if (linked := _linked_by_specifier(ctx, parameter)) is not None:
        return linked_info(linked)
    p = Body(parameter, "parameter")
    try:
        entry = find_instance(ctx, p.get("specifier", dict, required=True),
                              "parameter.specifier")
    except SdkError:
        if p.get("throwIfNotFound", bool, False):
            raise
        return None
    return instance_info(entry, ctx.namespace)


async def get_load_config(ctx: Context, parameter: Any) -> dict[str, Any]:
    if (linked := _linked_by_specifier(ctx, parameter)) is not None:
        # the upstream's load settings are its own; the context length is what it told us
        return {"fields": [{"key": "llm.load.contextLength",
                            "value": linked_info(linked)["contextLength"]}]}
    p = Body(parameter, "parameter")
    entry = find_instance(ctx, p.get("specifier", dict, required=True), "parameter.specifier")
    return {"fields": load_fields(entry, ctx.namespace)}


async def unload_model(ctx: Context, parameter: Any) -> None:
    identifier = Body(parameter, "parameter").get("identifier", str, required=True)
    entry = ctx.models.find_loaded(identifier)
    if entry is None:
        raise SdkError(f'No model with identifier "{shorten(identifier)}" is loaded.',
                       code=NO_MODEL)
    await ctx.models.unload(entry.identifier)


async def processing_state(ctx: Context, parameter: Any) -> dict[str, Any]:
    p = Body(parameter, "parameter")
    entry = find_instance(ctx, p.get("specifier", dict, required=True), "parameter.specifier")
    return {"status": entry.instance.status, "queued": entry.instance.queued}


async def tokenize(ctx: Context, parameter: Any) -> dict[str, Any]:
    entry, text = _text_call(ctx, parameter)
    return {"tokens": await asyncio.to_thread(entry.instance.tokenize, text)}


async def count_tokens(ctx: Context, parameter: Any) -> dict[str, Any]:
    entry, text = _text_call(ctx, parameter)
    return {"tokenCount": len(await asyncio.to_thread(entry.instance.tokenize, text))}


def _text_call(ctx: Context, parameter: Any) -> tuple[Loaded, str]:
    p = Body(parameter, "parameter")
    entry = find_instance(ctx, p.get("specifier", dict, required=True), "parameter.specifier")
    return entry, p.get("inputString", str, required=True)


async def embed_string(ctx: Context, parameter: Any) -> dict[str, Any]:
    p = Body(parameter, "parameter")
    entry = find_instance(ctx, p.get("modelSpecifier", dict, required=True),
                          "parameter.modelSpecifier")
    text = p.text("inputString", required=True, nonempty=True)  # llama.cpp: no empty input
    (vector,) = await embed(entry, [text])
    return {"embedding": vector}


# -- loading --------------------------------------------------------------------------------

async def get_or_load(ctx: Context, channel: Channel, parameter: Any) -> None:
    name = parameter.get("identifier") if isinstance(parameter, dict) else None
    if (found := linked_of(ctx, name)) is not None:
        # the upstream already holds the model: nothing loads here
        await channel.send({"type": "alreadyLoaded", "info": linked_info(found[1])})
        return
    p = Body(parameter, "creationParameter")
    name = p.get("identifier", str, required=True)
    options = load_config(collapse(p.get("loadConfigStack", dict), "loadConfigStack"),
                          ctx.namespace)
    ttl_ms = p.integer("loadTtlMs", low=1)
    events = ctx.models.get_or_load_events(
        name, ttl_s=ttl_ms / 1000 if ttl_ms else None, context_length=options.context_length,
        jit=False, gpu_ratio=options.gpu_ratio, parallel=options.parallel,
        **options.drafting())
    await _stream_load(ctx, channel, events, "loadProgress", "loadSuccess")


async def load_model(ctx: Context, channel: Channel, parameter: Any) -> None:
    p = Body(parameter, "creationParameter")
    key = p.get("modelKey", str, required=True)
    identifier = p.get("identifier", str)
    options = load_config(collapse(p.get("loadConfigStack", dict), "loadConfigStack"),
                          ctx.namespace)
    ttl_ms = p.integer("ttlMs", low=1)
    model = await ctx.models.check_load(key, identifier, options.context_length)
    check_model_domain(model, ctx.namespace)
    await channel.send({"type": "resolved", "info": listing_info(model)})
    events = ctx.models.load_events(
        model.model_key, identifier=identifier, context_length=options.context_length,
        gpu_ratio=options.gpu_ratio, parallel=options.parallel,
        ttl_s=ttl_ms / 1000 if ttl_ms else None, **options.drafting())
    await _stream_load(ctx, channel, events, "progress", "success")


async def _stream_load(ctx: Context, channel: Channel,
                       events: AsyncGenerator[JitEvent, None], progress: str,
                       success: str) -> None:
    """Progress messages, then the loaded instance; a cancel (or the client leaving) closes
    the events, which aborts the load between tensors."""

    async def relay() -> None:
        try:
            async for event in events:
                await channel.send(_load_message(ctx, event, progress, success))
        finally:
            await events.aclose()

    task = asyncio.ensure_future(relay())
    channel.on_cancel(task.cancel)
    try:
        await asyncio.wait({task})
    finally:
        task.cancel()  # the connection closed: stop the load with it
        await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise SdkError("The model load was cancelled.")
    task.result()


def _load_message(ctx: Context, event: JitEvent, progress: str, success: str
                  ) -> dict[str, Any]:
    """A load event as the channel's message: ``getOrLoad`` may find the model loaded
    (``alreadyLoaded``) or start loading it (``startLoading``); both then go alike."""
    if isinstance(event, LoadStart):
        check_model_domain(event.model, ctx.namespace)
        return {"type": "startLoading", "identifier": event.model.model_key,
                "info": listing_info(event.model)}
    if isinstance(event, LoadProgress):
        return {"type": progress, "progress": event.progress}
    check_domain(event.entry, ctx.namespace)
    kind = "alreadyLoaded" if event.seconds is None else success
    return {"type": kind, "info": instance_info(event.entry, ctx.namespace)}
