"""The namespaces and their websocket routes (``ws://host:port/<namespace>``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket

import lmscli
from lmscli.logbus import now_ms
from lmscli.logbus.events import server_log
from lmscli.server.sdk import models_ns as m
from lmscli.server.sdk.predict_ch import apply_prompt_template, predict
from lmscli.server.sdk.protocol import Channel, Connection, Context, Namespace
from lmscli.server.state import app_state

LOG_POLL_S = 0.5  # how often an idle log stream notices the server stopping


async def list_downloaded(ctx: Context, _: Any) -> list[dict[str, Any]]:
    return [m.listing_info(model) for model in ctx.models.downloaded()]


async def version(ctx: Context, _: Any) -> dict[str, Any]:
    return {"version": lmscli.__version__, "build": 0}


async def info(ctx: Context, _: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "isDaemon": False, "version": lmscli.__version__}


async def stream_logs(ctx: Context, channel: Channel, _: Any) -> None:
    """What ``lms log stream`` reads: every log bus event, until the client says stop."""
    bus = ctx.state.logs
    server = ctx.state.uvicorn_server
    subscriber = bus.subscribe()
    try:
        while not channel.cancelled.is_set() and not (server and server.should_exit):
            await subscriber.wait(LOG_POLL_S)
            for item in subscriber.take():
                if item["type"] == "log":
                    await channel.send({"type": "log", "log": item["log"]})
                else:  # LM Studio has no "dropped" message: say it as a log line
                    await channel.send({"type": "log", "log": {
                        "timestamp": now_ms(), "data": server_log(
                            f"{item['count']} log events were dropped: this reader was "
                            "too slow.", "warn")}})
    finally:
        bus.unsubscribe(subscriber)


def _model_namespace(name: str) -> Namespace:
    rpc: dict[str, Callable[..., Any]] = {
        "listLoaded": m.list_loaded, "getModelInfo": m.get_model_info,
        "getLoadConfig": m.get_load_config, "unloadModel": m.unload_model,
        "getInstanceProcessingState": m.processing_state, "tokenize": m.tokenize,
        "countTokens": m.count_tokens}
    channels: dict[str, Callable[..., Any]] = {"getOrLoad": m.get_or_load,
                                               "loadModel": m.load_model}
    if name == "llm":
        rpc["applyPromptTemplate"] = apply_prompt_template
        channels["predict"] = predict
    else:
        rpc["embedString"] = m.embed_string
    return Namespace(name, rpc, channels)


def namespaces() -> dict[str, Namespace]:
    return {ns.name: ns for ns in [
        _model_namespace("llm"),
        _model_namespace("embedding"),
        Namespace("system", {"listDownloadedModels": list_downloaded, "version": version,
                             "info": info}),
        Namespace("diagnostics", channels={"streamLogs": stream_logs}),
        Namespace("files", note=" lmscli's models take text only: no images or files."),
        Namespace("repository", note=" To download models, use lms get (or POST "
                                     "/api/v1/models/download)."),
        Namespace("runtime"),
        Namespace("plugins", note=" lmscli has no plugins."),
    ]}


async def serve(namespace: Namespace, websocket: WebSocket) -> None:
    """One SDK websocket on ``namespace``'s path."""
    await Connection(websocket, namespace, app_state(websocket).settings.api_key).run()
