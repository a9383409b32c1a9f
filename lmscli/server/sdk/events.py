"""Engine events as the messages of LM Studio's ``predict`` channel.

Shared by the websocket channel (``sdk.endpoints``) and lmscli's own NDJSON route
(``native.predict``), so both stream the same ``promptProcessingProgress``, ``fragment``,
``toolCallGeneration*`` and ``success`` messages.
"""

from __future__ import annotations

from typing import Any

from lmscli.engine import Done, Event, Fragment, PromptProgress
from lmscli.prompting.tools import CallArgs, CallEnd, CallStart, ContentDelta
from lmscli.server.models import Loaded


class SdkEvents:
    """Engine events → the SDK's predict messages, tool calls parsed out of the text."""

    def __init__(self, entry: Loaded, parser: Any, *, mark_recovered: bool = False) -> None:
        self.entry = entry
        self.parser = parser
        # lmscli's own client shows recovered calls; LM Studio's SDK knows no such field
        self.mark_recovered = mark_recovered

    def convert(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, PromptProgress):
            return [progress_event(event)]
        if isinstance(event, Fragment):
            if self.parser is None:
                return [fragment_event(event.text, event.tokens)]
            return [e for p in self.parser.feed(event.text) for e in self._parsed(p)]
        if isinstance(event, Done):
            tail = [e for p in self.parser.finish() for e in self._parsed(p)] \
                if self.parser else []
            stats = event.stats.to_lms()
            if self.parser and self.parser.calls:
                stats["stopReason"] = "toolCalls"
            return [*tail, {"type": "success", "stats": stats,
                            "modelInfo": self.entry.info()}]
        message = f"Prediction failed: {event.message}"
        # "title" is what the SDK reads (SerializedLMSExtendedError), "message" lmscli.client
        return [{"type": "error", "error": {"title": message, "message": message,
                                            "type": "server_error",
                                            "code": "prediction_failed"}}]

    def _parsed(self, p: Any) -> list[dict[str, Any]]:
        if isinstance(p, ContentDelta):
            return [fragment_event(p.text, 1)] if p.text else []
        if isinstance(p, CallStart):
            return [{"type": "toolCallGenerationStart", "toolCallId": p.id},
                    {"type": "toolCallGenerationNameReceived", "name": p.name}]
        if isinstance(p, CallArgs):
            return [{"type": "toolCallGenerationArgumentFragmentGenerated", "content": p.text}]
        if isinstance(p, CallEnd):
            end = {"type": "toolCallGenerationEnd", "toolCallRequest": {
                "type": "function", "id": p.id, "name": p.name, "arguments": p.arguments},
                "rawContent": p.raw}
            # lmscli's own mark: the model wrote this call as plain JSON, not in its format
            return [end | {"recovered": True}] if p.recovered and self.mark_recovered else [end]
        return []


def progress_event(event: PromptProgress) -> dict[str, Any]:
    return {"type": "promptProcessingProgress", "progress": event.progress, "details": {
        "cachedTokenCount": event.cached_tokens,
        "totalPromptTokenCount": event.total_tokens,
        "processedPromptTokenCount": event.processed_tokens,
        "unprocessedPromptTokenCount": event.total_tokens - event.processed_tokens}}


def fragment_event(text: str, tokens: int) -> dict[str, Any]:
    return {"type": "fragment", "fragment": {
        "content": text, "tokensCount": tokens, "containsDrafted": False,
        "reasoningType": "none", "isStructural": False}}
