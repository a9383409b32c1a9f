"""A turn's events as the messages of LM Studio's ``predict`` channel.

Shared by the websocket channel (``sdk/predict_ch.py``) and lmscli's own NDJSON route
(``native.predict``), so both stream the same ``promptProcessingProgress``, ``fragment``,
``toolCallGeneration*`` and ``success`` messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmscli.engine import PromptProgress
from lmscli.server.pipeline.turns import Closed, Failure, Finished, Grew, Idle, Opened, TurnOutput

# LM Studio marks the tags of a reasoning block as fragments of their own
REASONING_TAGS = {Opened: ("<think>", "reasoningStartTag"),
                  Closed: ("</think>", "reasoningEndTag")}


class SdkEvents:
    """Turn events → the SDK's predict messages."""

    def __init__(self, model_info: Callable[[], dict[str, Any]], *,
                 mark_recovered: bool = False) -> None:
        self.model_info = model_info  # read at the end: the instance's status then
        # lmscli's own client shows recovered calls; LM Studio's SDK knows no such field
        self.mark_recovered = mark_recovered

    def convert(self, event: TurnOutput) -> list[dict[str, Any]]:
        if isinstance(event, PromptProgress):
            return [progress_event(event)]
        if isinstance(event, Finished):
            return [{"type": "success", "stats": event.stats.to_lms(),
                     "modelInfo": self.model_info()}]
        if isinstance(event, Failure):
            return [failure_event(event.message)]
        if isinstance(event, Idle):
            return []
        block = event.block
        if block.kind == "call":
            return self._call(event)
        if block.kind == "reasoning":
            if isinstance(event, Grew):
                return [fragment_event(event.text, event.tokens, "reasoning")]
            text, kind = REASONING_TAGS[type(event)]
            return [fragment_event(text, 0, kind, structural=True)]
        return [fragment_event(event.text, event.tokens)] if isinstance(event, Grew) else []

    def _call(self, event: Opened | Grew | Closed) -> list[dict[str, Any]]:
        block = event.block
        if isinstance(event, Opened):
            return [{"type": "toolCallGenerationStart", "toolCallId": block.call_id},
                    {"type": "toolCallGenerationNameReceived", "name": block.name}]
        if isinstance(event, Grew):
            return [{"type": "toolCallGenerationArgumentFragmentGenerated",
                     "content": event.text}]
        end = {"type": "toolCallGenerationEnd", "toolCallRequest": {
            "type": "function", "id": block.call_id, "name": block.name,
            "arguments": block.arguments}, "rawContent": block.raw}
        # lmscli's own mark: the model wrote this call as plain JSON, not in its format
        return [end | {"recovered": True}] if block.recovered and self.mark_recovered \
            else [end]


def failure_event(message: str) -> dict[str, Any]:
    text = f"Prediction failed: {message}"
    # "title" is what the SDK reads (SerializedLMSExtendedError), "message" lmscli.client
    return {"type": "error", "error": {"title": text, "message": text, "type": "server_error",
                                       "code": "prediction_failed"}}


def progress_event(event: PromptProgress) -> dict[str, Any]:
    return {"type": "promptProcessingProgress", "progress": event.progress, "details": {
        "cachedTokenCount": event.cached_tokens,
        "totalPromptTokenCount": event.total_tokens,
        "processedPromptTokenCount": event.processed_tokens,
        "unprocessedPromptTokenCount": event.total_tokens - event.processed_tokens}}


def fragment_event(text: str, tokens: int, reasoning: str = "none", *,
                   structural: bool = False) -> dict[str, Any]:
    return {"type": "fragment", "fragment": {
        "content": text, "tokensCount": tokens, "containsDrafted": False,
        "reasoningType": reasoning, "isStructural": structural}}
