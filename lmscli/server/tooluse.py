"""Tool use on the chat routes: request fields, prompt building, and parsing calls back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmscli.prompting import TemplateRenderError, render_chat
from lmscli.prompting.tools import ToolCallParser, ToolFormat, call_grammar, detect_format
from lmscli.prompting.tools import prepare_chat as prepare_tool_chat
from lmscli.server.errors import Body, bad_request
from lmscli.server.models import Loaded


@dataclass
class ToolUse:
    tools: list[dict[str, Any]] | None  # the tools the model may call in this request
    fmt: ToolFormat
    grammar: str | None  # forces a call: tool_choice "required" or a named function

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.fmt) if self.tools else None


def parse_tools(body: Body) -> list[dict[str, Any]] | None:
    tools = body.get("tools", list)
    if not tools:
        return None
    for i, raw in enumerate(tools):
        tool = Body(raw, f"tools[{i}]")
        if tool.get("type", str, "function") != "function":
            raise bad_request(f"'tools[{i}].type' must be \"function\".", f"tools[{i}].type")
        fn = Body(tool.get("function", dict, required=True), f"tools[{i}].function")
        fn.get("name", str, required=True)
        fn.get("description", str)
        fn.get("parameters", dict)
    return tools


def parse_tool_choice(body: Body, tools: list[dict[str, Any]] | None) -> str | None:
    """"none" | "auto" | "required", or the name of the one function to call."""
    choice = body.get("tool_choice", (str, dict))
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request("'tool_choice' must be none, auto, required or "
                              '{"type": "function", "function": {"name": ...}}.', "tool_choice")
        if choice == "required" and not tools:
            raise bad_request("tool_choice \"required\" needs 'tools'.", "tool_choice")
        return choice
    name = Body(Body(choice, "tool_choice").get("function", dict, required=True),
                "tool_choice.function").get("name", str, required=True)
    if name not in {t["function"]["name"] for t in tools or []}:
        raise bad_request(f"tool_choice names {name!r}, which is not in 'tools'.",
                          "tool_choice.function.name")
    return name


def tool_use(body: Body, entry: Loaded) -> ToolUse:
    tools = parse_tools(body)
    choice = parse_tool_choice(body, tools)
    fmt = detect_format(entry.model.chat_template)
    if choice == "none" or not tools:
        return ToolUse(None, fmt, None)
    if choice == "auto":
        return ToolUse(tools, fmt, None)
    name = None if choice == "required" else choice
    return ToolUse(tools, fmt, call_grammar(tools, fmt, name))


def check_message_tool_fields(raw: dict[str, Any], i: int, out: dict[str, Any]) -> None:
    """Keep (and check) the OpenAI tool fields of one message."""
    where = f"messages[{i}]"
    if out["role"] == "assistant" and raw.get("tool_calls") is not None:
        calls = raw["tool_calls"]
        if not isinstance(calls, list):
            raise bad_request(f"'{where}.tool_calls' must be an array.", f"{where}.tool_calls")
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                             for j, c in enumerate(calls)]
    if out["role"] == "tool":
        call_id = raw.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise bad_request(f"'{where}.tool_call_id' must be a string.",
                              f"{where}.tool_call_id")
        out["tool_call_id"] = call_id


def _tool_call(raw: Any, where: str) -> dict[str, Any]:
    call = Body(raw, where)
    fn = Body(call.get("function", dict, required=True), f"{where}.function")
    name = fn.get("name", str, required=True)
    arguments = fn.get("arguments", (str, dict), "{}")
    if isinstance(arguments, dict):  # lenient: some clients send the object itself
        arguments = json.dumps(arguments)
    try:
        json.loads(arguments or "{}")
    except ValueError:
        raise bad_request(f"'{where}.function.arguments' must be a JSON object string.",
                          f"{where}.function.arguments") from None
    return {"id": call.get("id", str, ""), "type": "function",
            "function": {"name": name, "arguments": arguments or "{}"}}


def chat_prompt(entry: Loaded, messages: list[dict[str, Any]], use: ToolUse) -> str:
    """The exact prompt text: tool conversions for the format, then the chat template."""
    prepared, template_tools = prepare_tool_chat(messages, use.tools, use.fmt)
    instance = entry.instance
    try:
        return render_chat(entry.model.chat_template, prepared, tools=template_tools,
                           bos_token=instance.bos_token, eos_token=instance.eos_token)
    except TemplateRenderError as exc:
        raise bad_request(str(exc), "messages", "template_error") from exc
