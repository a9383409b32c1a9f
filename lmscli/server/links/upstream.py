"""Reading what a linked engine answers: SSE decoding, and the text, tool calls, finish
reason and usage of a completion gathered from its chunks (for the log bus and the SDK)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

STOP_REASONS = {"stop": "eosFound", "length": "maxPredictedTokensReached",
                "tool_calls": "toolCalls", "function_call": "toolCalls",
                "content_filter": "failed"}
DONE = "[DONE]"


class SseDecoder:
    """Bytes of an event stream → the JSON of each ``data:`` line (or ``[DONE]``), however
    the bytes were split."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Any]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # comments, event names, blank separators
            data = line[5:].strip()
            if data == DONE.encode():
                out.append(DONE)
                continue
            try:
                out.append(json.loads(data))
            except ValueError:
                continue  # not JSON: nothing to learn from it; the client still gets it
        return out


@dataclass
class ToolCall:
    id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def parsed_arguments(self) -> Any:
        """The arguments as JSON when they parse, else the raw text (the act loop reports
        that to the model as a call it could not read)."""
        text = "".join(self.arguments)
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return text


@dataclass
class UpstreamReply:
    """A completion as it arrives, chunk by chunk or whole."""

    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    ended: float | None = None
    parts: list[str] = field(default_factory=list)
    calls: dict[int, ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    chunks: int = 0  # events shaped as completion chunks (with a ``choices`` list)
    chunks_with_text: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed_chunk(self, event: Any) -> tuple[str, list[tuple[str, int, Any]]]:
        """One streamed chunk; returns its text and its tool-call changes, each
        ``("start", index, id) | ("name", index, name) | ("args", index, text)``."""
        if not isinstance(event, dict):
            return "", []
        if isinstance(event.get("error"), dict | str):
            err = event["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        choices = event.get("choices")
        self.chunks += isinstance(choices, list)
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return "", []
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = delta.get("content") or choice.get("text") or ""
        text = text if isinstance(text, str) else ""
        changes = self._tool_deltas(delta.get("tool_calls"))
        if text or changes:
            self._mark_first()
        if text:
            self.parts.append(text)
            self.chunks_with_text += 1
        return text, changes

    def _tool_deltas(self, deltas: Any) -> list[tuple[str, int, Any]]:
        # Servers differ: vLLM names a call once, llama-cpp-python repeats the id and name in
        # every chunk. A call is new when its index is; its name counts the first time.
        changes: list[tuple[str, int, Any]] = []
        for delta in deltas if isinstance(deltas, list) else []:
            if not isinstance(delta, dict):
                continue
            index = delta.get("index", 0) if isinstance(delta.get("index", 0), int) else 0
            fn = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            call = self.calls.get(index)
            if call is None:
                call = self.calls[index] = ToolCall(str(delta.get("id") or f"call_{index}"))
                changes.append(("start", index, call.id))
            name = fn.get("name")
            if isinstance(name, str) and name and not call.name:
                call.name = name
                changes.append(("name", index, name))
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                call.arguments.append(args)
                changes.append(("args", index, args))
        return changes

    def feed_whole(self, data: Any) -> None:
        """A non-streamed answer (chat or text completion)."""
        if not isinstance(data, dict):
            return
        self._mark_first()
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            self.feed_chunk({"choices": [{"delta": message,
                                          "finish_reason": choice.get("finish_reason")}],
                             "usage": data.get("usage")})
        else:
            self.feed_chunk(data)

    def _mark_first(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        if self.ended is None:
            self.ended = time.perf_counter()

    def stop_reason(self, stopped: bool = False) -> str:
        if stopped:
            return "userStopped"
        if self.calls:
            return "toolCalls"
        if self.error or self.finish_reason is None:
            return "failed"
        return STOP_REASONS.get(self.finish_reason, "eosFound")

    def stats(self, stopped: bool = False) -> dict[str, Any]:
        """LM Studio's prediction stats from the upstream's usage (counted text chunks when
        it sends none: one chunk is one token on the engines we know)."""
        self.end()
        assert self.ended is not None
        usage = self.usage or {}
        predicted = _count(usage.get("completion_tokens"))
        if predicted is None:
            predicted = self.chunks_with_text + len(self.calls)
        out: dict[str, Any] = {"stopReason": self.stop_reason(stopped),
                               "totalTimeSec": self.ended - self.started,
                               "predictedTokensCount": predicted}
        if self.first_at is not None:
            out["timeToFirstTokenSec"] = self.first_at - self.started
            span = self.ended - self.first_at
            if span > 0 and predicted > 1:
                out["tokensPerSecond"] = (predicted - 1) / span
        prompt = _count(usage.get("prompt_tokens"))
        if prompt is not None:
            out["promptTokensCount"] = prompt
            out["totalTokensCount"] = prompt + predicted
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
        if cached is not None:
            out["cachedPromptTokensCount"] = cached
        return out

    def output_text(self) -> str:
        """What the log shows as the output: the text, then any tool calls as JSON."""
        if not self.calls:
            return self.text
        calls = [{"id": c.id, "name": c.name, "arguments": c.parsed_arguments()}
                 for c in self.calls.values()]
        return self.text + ("\n" if self.text else "") + json.dumps(calls, ensure_ascii=False)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None
