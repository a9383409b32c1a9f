"""Chat histories with LM Studio's SDK surface (``lms.Chat``).

Messages are kept in LM Studio's wire shape: ``{"role", "content": [parts]}`` with parts
``{"type": "text", "text"}``, ``{"type": "toolCallRequest", "toolCallRequest": {...}}`` and
``{"type": "toolCallResult", "content", "toolCallId"}``.
"""

from __future__ import annotations

import copy as _copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmscli.errors import UserInputError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    """A history entry, as handed to ``on_message`` and accepted by ``Chat.append``."""

    role: str
    content: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": _copy.deepcopy(self.content)}

    def __str__(self) -> str:
        return f"{type(self).__name__}.from_dict({json.dumps(self.to_dict())})"


class AssistantResponse(Message):
    def __init__(self, content: list[dict[str, Any]] | str) -> None:
        super().__init__("assistant", _parts(content))


class ToolResultMessage(Message):
    def __init__(self, content: list[dict[str, Any]]) -> None:
        super().__init__("tool", content)


def _parts(content: Any) -> list[dict[str, Any]]:
    """Message content in any accepted form → a list of parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if hasattr(content, "content") and isinstance(getattr(content, "content", None), str):
        return [{"type": "text", "text": content.content}]  # a PredictionResult
    if isinstance(content, Mapping):
        if "text" in content and "type" not in content:
            return [{"type": "text", "text": content["text"]}]
        return [dict(content)]
    if isinstance(content, Iterable):
        parts: list[dict[str, Any]] = []
        for item in content:
            parts.extend(_parts(item))
        return parts
    raise UserInputError(f"Unsupported message content: {content!r}")


class Chat:
    """A conversation: an optional system prompt, then user/assistant/tool messages."""

    def __init__(self, initial_prompt: str | Mapping[str, Any] | None = None) -> None:
        self._messages: list[dict[str, Any]] = []
        if initial_prompt is not None:
            self.add_system_prompt(initial_prompt)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_history(cls, history: Any) -> Chat:
        """A Chat from a str (one user message), a Chat, or {"messages": [...]}."""
        if isinstance(history, Chat):
            return history.copy()
        chat = cls()
        if isinstance(history, str):
            chat.add_user_message(history)
            return chat
        if isinstance(history, Mapping) and "messages" in history:
            history = history["messages"]
        for entry in history:
            if isinstance(entry, tuple | list) and len(entry) == 2:
                chat.add_entry(entry[0], entry[1])
            else:
                chat.append(entry)
        return chat

    def add_system_prompt(self, prompt: str | Mapping[str, Any]) -> Message:
        return self._add("system", prompt)

    def add_user_message(self, content: Any, *, images: Iterable[Any] = ()) -> Message:
        if list(images):
            raise UserInputError("Images are not supported by lmscli yet.")
        parts = _parts(content)
        if not parts or all(not p.get("text") for p in parts if p.get("type") == "text"):
            raise UserInputError("A user message needs some content.")
        if self._messages and self._messages[-1]["role"] == "user":
            self._messages[-1]["content"].extend(parts)  # consecutive user turns merge
            return Message("user", self._messages[-1]["content"])
        return self._add("user", parts)

    def add_assistant_response(self, response: Any,
                               tool_call_requests: Iterable[Mapping[str, Any]] = ()
                               ) -> Message:
        parts = _parts(response)
        parts += [{"type": "toolCallRequest", "toolCallRequest": dict(r)}
                  for r in tool_call_requests]
        return self._add("assistant", parts)

    def add_tool_results(self, results: Iterable[Mapping[str, Any]]) -> Message:
        parts = [{"type": "toolCallResult", "content": r["content"],
                  "toolCallId": r.get("toolCallId", r.get("tool_call_id"))} for r in results]
        return self._add("tool", parts)

    def add_tool_result(self, result: Mapping[str, Any]) -> Message:
        return self.add_tool_results([result])

    def add_entry(self, role: str, content: Any) -> Message:
        if role == "system":
            return self.add_system_prompt(content)
        if role == "user":
            return self.add_user_message(content)
        if role == "assistant":
            return self.add_assistant_response(content)
        if role == "tool":
            return self.add_tool_results(_parts(content))
        raise UserInputError(f"Unknown role {role!r}: use one of {', '.join(ROLES)}.")

    def append(self, message: Message | Mapping[str, Any]) -> Message:
        """Add a message as it comes: made for ``on_message=chat.append``."""
        if isinstance(message, Message):
            return self._add(message.role, message.content)
        if isinstance(message, Mapping) and "role" in message:
            return self.add_entry(message["role"], message.get("content", ""))
        raise UserInputError(f"Cannot append {message!r} to a chat.")

    def _add(self, role: str, content: Any) -> Message:
        if role not in ROLES:
            raise UserInputError(f"Unknown role {role!r}: use one of {', '.join(ROLES)}.")
        parts = _copy.deepcopy(_parts(content))
        last = self._messages[-1]["role"] if self._messages else None
        if last == role and role in ("system", "assistant"):
            raise UserInputError(f"Multi-part or consecutive {role} messages are not "
                                 "supported.")
        self._messages.append({"role": role, "content": parts})
        return Message(role, parts)

    def drop_last(self) -> None:
        """Remove the last message (the REPL uses it to retry or undo a failed turn)."""
        if self._messages:
            self._messages.pop()

    # -- reading --------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, Any]]:
        return _copy.deepcopy(self._messages)

    def copy(self) -> Chat:
        chat = Chat()
        chat._messages = _copy.deepcopy(self._messages)
        return chat

    def __len__(self) -> int:
        return len(self._messages)

    def __str__(self) -> str:
        return f"Chat.from_history({json.dumps({'messages': self._messages}, indent=2)})"

    def to_openai(self) -> list[dict[str, Any]]:
        """The history as OpenAI chat messages, for the server."""
        return [to_openai_message(m) for m in self._messages]


def to_openai_message(message: Mapping[str, Any]) -> dict[str, Any]:
    parts = message["content"]
    text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
    out: dict[str, Any] = {"role": message["role"], "content": text}
    calls = [p["toolCallRequest"] for p in parts if p.get("type") == "toolCallRequest"]
    if calls:
        out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
            "name": c["name"], "arguments": json.dumps(c.get("arguments") or {})}}
            for c in calls]
    results = [p for p in parts if p.get("type") == "toolCallResult"]
    if message["role"] == "tool" and results:
        # one OpenAI tool message per result; the caller flattens
        out["results"] = [{"content": r["content"], "tool_call_id": r.get("toolCallId")}
                          for r in results]
    return out
