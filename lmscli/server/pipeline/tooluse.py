"""Tool use on the chat routes: request fields, prompt building, and parsing calls back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from lmscli.prompting import TemplateRenderError, render_chat
from lmscli.prompting.grammar import SchemaError
from lmscli.prompting.template import TemplateTimeout
from lmscli.prompting.tools import (
    ToolCallParser,
    ToolFormat,
    call_grammar,
    detect_format,
    fold_system_messages,
)
from lmscli.prompting.tools import prepare_chat as prepare_tool_chat
from lmscli.server.body import Body
from lmscli.server.errors import bad_request, shorten
from lmscli.server.models import Loaded

if TYPE_CHECKING:
    from lmscli.logbus.events import RecoveredCalls

# A chat template gets this much of its own CPU time to render, in a thread of its own. Each
# model renders at most RENDER_SLOTS prompts at once and a request waits at most the budget
# for a slot: renders share the interpreter, and a template that loops must hold up only its
# own model's requests, not the event loop, the shared thread pool or another model's renders.
TEMPLATE_BUDGET_S = 5.0
RENDER_SLOTS = 1  # the GIL runs one render at a time anyway
# A render's request gives up after this many budgets of wall time even if the render goes
# on (one operation can't be interrupted, and renders of many models share the CPU).
RENDER_WALL_BUDGETS = 4
MAX_TOOL_NAME_CHARS = 256


@dataclass
class ToolUse:
    tools: list[dict[str, Any]] | None  # the tools the model may call in this request
    fmt: ToolFormat
    grammar: str | None  # forces a call: tool_choice "required" or a named function

    def parser(self, id_prefix: str = "call_") -> ToolCallParser | None:
        if not self.tools:
            return None
        # the offered names let the parser recover calls written as plain JSON
        return ToolCallParser(self.fmt, id_prefix,
                              offered=[t["function"]["name"] for t in self.tools])

    def log_recovered(self) -> RecoveredCalls | None:
        """What the prediction's log entry uses to mark recovered calls; None without tools."""
        return self.recovered_calls if self.tools else None

    def recovered_calls(self, text: str) -> list[str]:
        """The names of the calls in ``text`` that were written loosely (for the log)."""
        parser = self.parser()
        if parser is None:
            return []
        parser.feed(text)
        parser.finish()
        return [call.name for call in parser.calls if call.recovered]


def function_tool(name: str, description: str | None,
                  parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function tool built from another API's declaration (Responses, Messages), as chat
    completions' ``prompt_tool`` would show it: only what tells the model how to call it."""
    fn: dict[str, Any] = {"name": name}
    if description:
        fn["description"] = description
    fn["parameters"] = parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": fn}


def parse_tools(body: Body) -> list[dict[str, Any]] | None:
    """OpenAI chat's ``tools``, checked, as the prompt shows them."""
    tools = body.get("tools", list)
    if not tools:
        return None
    out = []
    for i, raw in enumerate(tools):
        tool = Body(raw, f"tools[{i}]")
        if tool.get("type", str, "function") != "function":
            raise bad_request(f"'tools[{i}].type' must be \"function\".", f"tools[{i}].type")
        fn = Body(tool.get("function", dict, required=True), f"tools[{i}].function")
        check_tool_name(fn)
        fn.get("description", str)
        fn.get("parameters", dict)
        out.append(prompt_tool(tool.data, fn.data))
    return out


def check_tool_name(tool: Body, key: str = "name") -> str:
    name = tool.get(key, str, required=True)
    if not name or len(name) > MAX_TOOL_NAME_CHARS or not name.isprintable():
        where = f"{tool.prefix}.{key}"
        raise bad_request(f"'{where}' must be 1 to {MAX_TOOL_NAME_CHARS} printable characters.",
                          where)
    return name


def prompt_tool(tool: dict[str, Any], fn: dict[str, Any]) -> dict[str, Any]:
    """A chat tool as the prompt shows it: what tells the model how to call it, in the order
    the client wrote it (a template renders it as it is, and small models follow the bytes);
    ``strict`` and other fields for the API alone are dropped, as Responses' tools drop them."""
    kept = {k: v for k, v in fn.items() if k in ("name", "description", "parameters")}
    return {k: kept if k == "function" else v for k, v in tool.items()
            if k in ("type", "function")}


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
        raise bad_request(f"tool_choice names {shorten(name)!r}, which is not in 'tools'.",
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
    try:
        return ToolUse(tools, fmt, call_grammar(tools, fmt, name))
    except SchemaError as exc:  # only a forced call turns the parameters into a grammar
        raise bad_request(f"Unsupported JSON schema: {shorten(str(exc), 500)}", "tools",
                          "invalid_schema") from None


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


async def chat_prompt(entry: Loaded, messages: list[dict[str, Any]], use: ToolUse) -> str:
    """The exact prompt text: tool conversions for the format, then the chat template,
    rendered in a thread of its own within TEMPLATE_BUDGET_S of CPU time. A template that
    refuses system messages after the first turn gets them folded into the user turns."""
    try:
        try:
            return await _render(entry, messages, use)
        except TemplateRenderError as exc:
            folded = fold_system_messages(messages)
            if folded == messages or isinstance(exc, TemplateTimeout):
                raise
            return await _render(entry, folded, use)
    except TemplateRenderError as exc:
        raise bad_request(str(exc), "messages", "template_error") from None
    except asyncio.TimeoutError:
        raise bad_request(f"The model's chat template ran for more than "
                          f"{TEMPLATE_BUDGET_S:g} s and was stopped.", "messages",
                          "template_error") from None


async def _render(entry: Loaded, messages: list[dict[str, Any]], use: ToolUse) -> str:
    prepared, template_tools = prepare_tool_chat(messages, use.tools, use.fmt)
    instance = entry.instance
    render = partial(render_chat, entry.model.chat_template, prepared, tools=template_tools,
                     bos_token=instance.bos_token, eos_token=instance.eos_token,
                     time_budget_s=TEMPLATE_BUDGET_S)
    slots = _render_slots(entry)
    try:
        await asyncio.wait_for(slots.acquire(), TEMPLATE_BUDGET_S)
    except asyncio.TimeoutError:
        raise TemplateTimeout(f"The model's chat template is still rendering earlier requests "
                              f"after {TEMPLATE_BUDGET_S:g} s; try again later.") from None
    running = _in_own_thread(render)
    # the slot is the thread's: a request that stops waiting leaves it taken until the
    # render ends, so abandoned renders can't pile up
    running.add_done_callback(lambda _: slots.release())
    return await asyncio.wait_for(asyncio.shield(running),
                                  TEMPLATE_BUDGET_S * RENDER_WALL_BUDGETS)


# Each loaded model's render slots, by id(entry): Loaded is not hashable.
_slots: dict[int, asyncio.Semaphore] = {}


def _render_slots(entry: Loaded) -> asyncio.Semaphore:
    key = id(entry)
    if key not in _slots:
        _slots[key] = asyncio.Semaphore(RENDER_SLOTS)
        weakref.finalize(entry, _slots.pop, key, None)  # before the id can be reused
    return _slots[key]


def _in_own_thread(work: Callable[[], str]) -> asyncio.Future[str]:
    """Run ``work`` in a new thread: renders never queue behind the shared pool's other work
    (or fill it), and a model's slots bound how many of its threads there are."""
    done: concurrent.futures.Future[str] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as exc:  # whatever it is, the slot must come back
            done.set_exception(exc)

    threading.Thread(target=run, name="chat-template", daemon=True).start()
    return asyncio.wrap_future(done)
