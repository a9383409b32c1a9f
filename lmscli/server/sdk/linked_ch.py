"""A prediction on a linked model over the SDK's websocket (``lms.llm("link/model")
.respond(...)`` with the official ``lmstudio`` package): the ``predict`` channel sends it to
the upstream through the Forwarder (``link_sdk``), and its chunks come back as the channel's
messages. ``models_ns`` answers for linked models in the ``llm`` namespace's other endpoints.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lmscli.server.body import Body
from lmscli.server.links.registry import LinkedModel, LinkTarget
from lmscli.server.links.sdk import open_prediction, sdk_payload
from lmscli.server.sdk.kvconfig import PredictionConfig
from lmscli.server.sdk.models_ns import linked_info
from lmscli.server.sdk.protocol import Channel, Context


def upstream_payload(config: PredictionConfig, target: LinkTarget) -> dict[str, Any]:
    """The SDK's prediction as an OpenAI request: ``complete()`` as a text completion."""
    payload = sdk_payload(Body(config.body), target)
    if config.raw_prompt:  # the SDK's completion template joins the contents, nothing else
        payload["prompt"] = "".join(str(m.get("content") or "")
                                    for m in payload.pop("messages"))
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        fmt["json_schema"].setdefault("name", "response")  # OpenAI servers require one
    return payload


async def predict(ctx: Context, channel: Channel, config: PredictionConfig, target: LinkTarget,
                  model: LinkedModel) -> None:
    forwarder = ctx.state.linked.forwarder
    prediction = await open_prediction(forwarder, target, model,
                                       upstream_payload(config, target))
    channel.on_cancel(prediction.cancel)  # ends it with userStopped, as a local one ends
    # the client needs all four keys of a success; the upstream's settings are its own
    extra = {"modelInfo": linked_info(model), "loadModelConfig": {"fields": []},
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
