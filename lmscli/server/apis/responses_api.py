"""OpenAI's Responses API: ``POST /v1/responses`` (whole or streamed), and ``GET`` / ``DELETE
/v1/responses/{id}`` for the responses kept in memory (``store``, ``previous_response_id``)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lmscli.engine import PredictionStats
from lmscli.prompting.lark import GrammarSyntaxError, lark_input_gbnf, regex_input_gbnf
from lmscli.server.apis.parsing import format_grammar, read_json, sampling
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request, shorten
from lmscli.server.pipeline.local import open_turn
from lmscli.server.pipeline.tooluse import check_tool_name, function_tool
from lmscli.server.pipeline.turns import (
    AnyTurn,
    Block,
    Closed,
    Failure,
    Finished,
    Grew,
    Opened,
    TurnInput,
    assistant_message,
    chat_response_format,
)
from lmscli.server.state import Kept, app_state
from lmscli.server.streams import sse_event, sse_stream

log = logging.getLogger("lmscli.server")

MAX_STORED = 500  # responses kept for previous_response_id and GET; the oldest go first
INCOMPLETE = {"maxPredictedTokensReached", "contextLengthReached"}
# Responses fields for features this server lacks: a value that asks for one is a 400.
UNSUPPORTED = ("background", "conversation", "prompt")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = {"input_text", "output_text", "text", "refusal"}


# -- the request -----------------------------------------------------------------------------

def input_messages(body: Body) -> list[dict[str, Any]]:
    """``input`` (a string, or message / function_call / function_call_output items) as chat
    messages."""
    raw = body.get("input", (str, list), required=True)
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not raw:
        raise bad_request("Field 'input' must not be empty.", "input")
    out: list[dict[str, Any]] = []
    for i, data in enumerate(raw):
        item = Body(data, f"input[{i}]")
        kind = item.get("type", str, "message")
        if kind == "message":
            out.append(_message(item, f"input[{i}]"))
        elif kind == "function_call":
            _add_call(out, item, f"input[{i}]")
        elif kind == "custom_tool_call":
            _add_call(out, item, f"input[{i}]", custom=True)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append({"role": "tool", "tool_call_id": item.get("call_id", str),
                        "content": _text(item.data.get("output"), f"input[{i}].output")})
        elif kind != "reasoning":  # earlier reasoning is dropped, as chat templates drop it
            raise bad_request(f"'input[{i}].type' {shorten(kind)!r} is not supported: send "
                              "message, function_call, function_call_output, custom_tool_call or"
                              " custom_tool_call_output items.",
                              f"input[{i}].type")
    return out


def _message(item: Body, where: str) -> dict[str, Any]:
    role = item.get("role", str, required=True)
    if role not in ROLES:
        raise bad_request(f"'{where}.role' must be one of user, assistant, system, developer.",
                          f"{where}.role")
    return {"role": ROLES[role], "content": _text(item.data.get("content"), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    """A string, or text parts (input_text, output_text) joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of content parts.", where)
    parts = []
    for i, raw in enumerate(content):
        part = Body(raw, f"{where}[{i}]")
        kind = part.get("type", str, required=True)
        if kind not in TEXT_PARTS:
            raise bad_request(f"'{where}[{i}]' is a {shorten(kind)!r} part; only text parts "
                              "(input_text) are supported.", f"{where}[{i}].type")
        parts.append(part.get("refusal" if kind == "refusal" else "text", str, ""))
    return "".join(parts)


def _add_call(out: list[dict[str, Any]], item: Body, where: str, custom: bool = False) -> None:
    """A function_call (or custom_tool_call) item joins the assistant turn it belongs to."""
    if custom:  # the model wrote it as a call with one argument
        arguments = json.dumps({"input": item.get("input", str, "")}, ensure_ascii=False)
    else:
        arguments = item.text("arguments", "{}") or "{}"
    try:
        if not isinstance(json.loads(arguments), dict):
            raise ValueError
    except ValueError:
        raise bad_request(f"'{where}.arguments' must be a JSON object string.",
                          f"{where}.arguments") from None
    name = item.get("name", str, required=True)
    if namespace := item.get("namespace", str):
        name = in_namespace(namespace, name)
    call = {"id": item.get("call_id", str, required=True), "type": "function",
            "function": {"name": name, "arguments": arguments}}
    if not out or out[-1]["role"] != "assistant":
        out.append({"role": "assistant", "content": ""})
    out[-1].setdefault("tool_calls", []).append(call)


def in_namespace(namespace: str, name: str) -> str:
    """The name the model sees for a function of a namespace tool."""
    return f"{namespace}.{name}"


@dataclass
class Tools:
    sent: list[Any]  # as the client sent them, echoed in the response
    chat: list[dict[str, Any]] = field(default_factory=list)  # what the model is offered
    # the model's name of each namespace function: its namespace and its own name
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)
    # the model's name of each freeform (custom) tool, and the GBNF of its input or None
    custom: dict[str, str | None] = field(default_factory=dict)

    def forced_input(self, choice: str | dict[str, Any] | None) -> str | None:
        """The grammar of a forced freeform tool's input, if it has one."""
        if isinstance(choice, dict):
            return self.custom.get(choice["function"]["name"])
        return None


def custom_tool(tool: Body, name: str, description: str | None, tools: Tools
                ) -> dict[str, Any]:
    """A freeform tool, offered to the model as a function of one string, ``input``; its
    grammar (Lark or a regex) constrains that string when the call is forced."""
    fmt = Body(tool.get("format", dict, {"type": "text"}), f"{tool.prefix}.format")
    kind = fmt.get("type", str, "text")
    about = "The tool's input, as free text."
    grammar = None
    if kind == "grammar":
        grammar, about = input_grammar(fmt)
    elif kind != "text":
        raise bad_request(f"'{fmt.prefix}.type' must be text or grammar.", f"{fmt.prefix}.type")
    tools.custom[name] = grammar
    return function_tool(name, description, {
        "type": "object", "properties": {"input": {"type": "string", "description": about}},
        "required": ["input"]})


def input_grammar(fmt: Body) -> tuple[str, str]:
    """A grammar format's GBNF for the input, and the input's description for the model."""
    syntax = fmt.get("syntax", str, required=True)
    definition = fmt.get("definition", str, required=True)
    convert = {"lark": lark_input_gbnf, "regex": regex_input_gbnf}.get(syntax)
    if convert is None:
        raise bad_request(f"'{fmt.prefix}.syntax' must be lark or regex.", f"{fmt.prefix}.syntax")
    where = f"{fmt.prefix}.definition"
    try:
        grammar = convert(definition)
    except GrammarSyntaxError as exc:
        raise bad_request(f"'{where}' is not a grammar this server can follow: "
                          f"{shorten(str(exc), 300)}", where, "invalid_grammar") from None
    return grammar, f"The tool's input, text that follows this {syntax} grammar:\n{definition}"


def function_tools(body: Body) -> Tools:
    """The function tools, and those grouped in namespace tools (the model sees them as
    ``namespace.name``). The others are left out with a log line, not refused: agents such as
    Codex offer hosted tools (web_search, …) that only OpenAI's servers run, beside the
    function tools a local model can call."""
    tools = Tools(body.get("tools", list, []))
    skipped: list[str] = []
    for i, raw in enumerate(tools.sent):
        tool = Body(raw, f"tools[{i}]")
        kind = tool.get("type", str, required=True)
        if kind == "function":
            tools.chat.append(function_tool(check_tool_name(tool), tool.get("description", str),
                                            tool.get("parameters", dict)))
        elif kind == "custom":
            tools.chat.append(custom_tool(tool, check_tool_name(tool), tool.get("description", str),
                                          tools))
        elif kind == "namespace":
            skipped += _namespace_tools(tool, tools)
        else:
            skipped.append(shorten(kind, 40))
    if skipped:
        log.info("/v1/responses: left out tools this server cannot run: %s",
                 ", ".join(sorted(set(skipped))))
    return tools


def _namespace_tools(tool: Body, tools: Tools) -> list[str]:
    """Adds a namespace tool's functions to ``tools``; returns the kinds it left out."""
    namespace = check_tool_name(tool)
    about = tool.get("description", str)
    skipped = []
    for j, raw in enumerate(tool.get("tools", list, [])):
        inner = Body(raw, f"{tool.prefix}.tools[{j}]")
        kind = inner.get("type", str, required=True)
        if kind not in ("function", "custom"):
            skipped.append(f"{namespace}.{shorten(kind, 40)}")
            continue
        name = check_tool_name(inner)
        qualified = in_namespace(namespace, name)
        tools.namespaced[qualified] = (namespace, name)
        description = inner.get("description", str)
        if about:
            description = f"({about}) {description or ''}".strip()
        tools.chat.append(
            custom_tool(inner, qualified, description, tools) if kind == "custom" else
            function_tool(qualified, description, inner.get("parameters", dict)))
    return skipped


def chat_tool_choice(body: Body) -> str | dict[str, Any] | None:
    choice = body.get("tool_choice", (str, dict))
    if not isinstance(choice, dict):
        return choice  # none | auto | required, checked with the tools
    spec = Body(choice, "tool_choice")
    if spec.get("type", str, required=True) not in ("function", "custom"):
        raise bad_request("'tool_choice' must be none, auto, required, "
                          '{"type": "function", "name": ...} or {"type": "custom", "name": ...}.',
                          "tool_choice")
    name = spec.get("name", str, required=True)
    if namespace := spec.get("namespace", str):
        name = in_namespace(namespace, name)
    return {"type": "function", "function": {"name": name}}


def text_format(body: Body) -> tuple[dict[str, Any], str | None]:
    """(``text.format`` as echoed back, its grammar or None)."""
    fmt = Body(body.get("text", dict, {}), "text").get("format", dict)
    if fmt is None:
        return {"type": "text"}, None
    return fmt, format_grammar(Body(fmt, "text.format"))


def reject_unsupported(body: Body) -> None:
    for key in UNSUPPORTED:
        if body.data.get(key):
            raise bad_request(f"'{key}' is not supported by this server; leave it out.", key,
                              "unsupported_parameter")


# -- storage ---------------------------------------------------------------------------------

@dataclass
class Stored:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # this turn's input and output, as chat messages
    previous: str | None


def conversation(store: Kept[Stored], response_id: str) -> list[dict[str, Any]]:
    """The messages of a conversation, rebuilt by following ``previous_response_id`` back
    (each stored response keeps only its own turn)."""
    turns: list[list[dict[str, Any]]] = []
    current: str | None = response_id
    while current is not None:
        stored = store.get(current)
        if stored is None:
            raise APIError(404, f"Previous response with id '{shorten(current)}' not found"
                           f" (this server keeps the latest {store.limit} responses, in "
                           "memory).", param="previous_response_id",
                           code="previous_response_not_found")
        turns.append(stored.messages)
        current = stored.previous
    return [m for turn in reversed(turns) for m in turn]


def store_of(request: Request) -> Kept[Stored]:
    return app_state(request).part("responses", lambda: Kept(MAX_STORED))


# -- the response ----------------------------------------------------------------------------

class Draft:
    """The response object as it goes from in_progress to its end, and its output items."""

    def __init__(self, body: Body, tools: Tools, fmt: dict[str, Any], params: Any) -> None:
        self.id = "resp_" + secrets.token_hex(24)
        self.created_at = int(time.time())
        self.model = body.data.get("model")  # the loaded model's identifier, once known
        self.stream = body.get("stream", bool, False)
        self.echo = {
            "instructions": body.data.get("instructions"),
            "max_output_tokens": params.max_tokens,
            "parallel_tool_calls": body.get("parallel_tool_calls", bool, True),
            "previous_response_id": body.data.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", bool, True),
            "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": fmt}, "tool_choice": body.data.get("tool_choice") or "auto",
            "tools": tools.sent, "truncation": "disabled", "user": None,
            "metadata": body.get("metadata", dict, {}),
        }
        self._item_ids: dict[int, str] = {}
        self._namespaced = tools.namespaced
        self.custom = tools.custom

    def response(self, status: str, output: list[dict[str, Any]], **rest: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": status, "background": False, "error": None,
                "incomplete_details": None, "model": self.model, "output": output,
                "usage": None} | self.echo | rest

    def item_id(self, block: Block) -> str:
        prefix = "ctc_" if self.is_custom(block) else \
            {"reasoning": "rs_", "text": "msg_", "call": "fc_"}[block.kind]
        return self._item_ids.setdefault(block.index, prefix + secrets.token_hex(24))

    def item(self, block: Block, status: str) -> dict[str, Any]:
        """The output item for ``block``; in progress, an item as it is first announced."""
        done = status != "in_progress"
        base = {"id": self.item_id(block), "status": status}
        if block.kind == "reasoning":
            content = [{"type": "reasoning_text", "text": block.text}] if done else []
            return base | {"type": "reasoning", "summary": [], "content": content}
        if block.kind == "text":
            content = [text_part(block.text)] if done else []
            return base | {"type": "message", "role": "assistant", "content": content}
        if self.is_custom(block):
            return base | {"type": "custom_tool_call", "call_id": block.call_id,
                           "input": custom_input(block.text) if done else "",
                           **self.call_name(block)}
        return base | {"type": "function_call", "call_id": block.call_id,
                       "arguments": block.text if done else "", **self.call_name(block)}

    def is_custom(self, block: Block) -> bool:
        return block.kind == "call" and block.name in self.custom

    def call_name(self, block: Block) -> dict[str, str]:
        """``name``, and ``namespace`` for a function of a namespace tool."""
        if block.name in self._namespaced:
            namespace, name = self._namespaced[block.name]
            return {"name": name, "namespace": namespace}
        return {"name": block.name}

    def final(self, blocks: list[Block], finished: Finished, reasoning_tokens: int
              ) -> dict[str, Any]:
        stats = finished.stats
        incomplete = stats.stop_reason in INCOMPLETE
        output = [self.item(b, item_status(b, blocks, finished)) for b in blocks]
        return self.response(
            "incomplete" if incomplete else "completed", output,
            completed_at=int(time.time()), usage=usage(stats, reasoning_tokens),
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None)


def custom_input(arguments: str) -> str:
    """A freeform tool's input out of the call's arguments: ``input``, or the one string a
    model wrote under another name, or else the arguments as they are."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(parsed, dict):
        if isinstance(parsed.get("input"), str):
            return parsed["input"]
        strings = [v for v in parsed.values() if isinstance(v, str)]
        if len(parsed) == 1 and strings:
            return strings[0]
    return arguments


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def item_status(block: Block, blocks: list[Block], finished: Finished | None) -> str:
    """An item is complete unless the reply was cut off inside it (the last one)."""
    cut = finished is not None and finished.stats.stop_reason in INCOMPLETE
    return "incomplete" if cut and block is blocks[-1] else "completed"


def usage(stats: PredictionStats, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": stats.prompt_tokens,
            "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": stats.predicted_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": stats.total_tokens}


class EventStream:
    """The typed server-sent events, numbered in order, of one streamed response."""

    def __init__(self, draft: Draft, turn: AnyTurn,
                 on_final: Callable[[Finished], dict[str, Any]]) -> None:
        self.draft, self.turn, self.on_final = draft, turn, on_final
        self.seq = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(kind, data)

    async def run(self) -> AsyncIterator[bytes]:
        started = self.draft.response("in_progress", [])
        yield self.event("response.created", response=started)
        yield self.event("response.in_progress", response=started)
        async for event in self.turn.stream():
            if isinstance(event, Finished):
                final = self.on_final(event)
                kind = "response.completed" if final["status"] == "completed" else \
                    "response.incomplete"
                yield self.event(kind, response=final)
            elif isinstance(event, Failure):
                yield self._failed(event)
            elif isinstance(event, Opened | Grew | Closed):
                for chunk in self._block_events(event):
                    yield chunk

    def _failed(self, failure: Failure) -> bytes:
        blocks = self.turn.blocks.all
        output = [self.draft.item(b, "incomplete") for b in blocks]
        error = {"code": "server_error", "message": failure.message}
        return self.event("response.failed",
                          response=self.draft.response("failed", output, error=error))

    def _block_events(self, event: Opened | Grew | Closed) -> list[bytes]:
        block, draft = event.block, self.draft
        at = {"output_index": block.index, "item_id": draft.item_id(block)}
        if isinstance(event, Opened):
            out = [self.event("response.output_item.added", output_index=block.index,
                              item=draft.item(block, "in_progress"))]
            if block.kind != "call":
                out.append(self.event("response.content_part.added", **at, content_index=0,
                                      part=self._part(block, "")))
            return out
        if isinstance(event, Grew):
            # a freeform call's input is known once its arguments are whole
            return [] if draft.is_custom(block) else [self._delta(block, at, event.text)]
        return self._closed(block, at)

    def _part(self, block: Block, text: str) -> dict[str, Any]:
        return {"type": "reasoning_text", "text": text} if block.kind == "reasoning" \
            else text_part(text)

    def _delta(self, block: Block, at: dict[str, Any], text: str) -> bytes:
        if block.kind == "call":
            return self.event("response.function_call_arguments.delta", **at, delta=text)
        if block.kind == "reasoning":
            return self.event("response.reasoning_text.delta", **at, content_index=0,
                              delta=text)
        return self.event("response.output_text.delta", **at, content_index=0, delta=text,
                          logprobs=[])

    def _closed(self, block: Block, at: dict[str, Any]) -> list[bytes]:
        if self.draft.is_custom(block):
            text = custom_input(block.text)
            out = [self.event("response.custom_tool_call_input.delta", **at, delta=text),
                   self.event("response.custom_tool_call_input.done", **at, input=text)]
        elif block.kind == "call":
            out = [self.event("response.function_call_arguments.done", **at,
                              name=self.draft.call_name(block)["name"], arguments=block.text)]
        else:
            text_done = "response.reasoning_text.done" if block.kind == "reasoning" \
                else "response.output_text.done"
            extra = {} if block.kind == "reasoning" else {"logprobs": []}
            out = [self.event(text_done, **at, content_index=0, text=block.text, **extra),
                   self.event("response.content_part.done", **at, content_index=0,
                              part=self._part(block, block.text))]
        status = item_status(block, self.turn.blocks.all, self.turn.finished)
        return out + [self.event("response.output_item.done", output_index=block.index,
                                 item=self.draft.item(block, status))]


# -- handlers --------------------------------------------------------------------------------

async def create(request: Request) -> Any:
    body = await read_json(request)
    reject_unsupported(body)
    params = sampling(body, limit_key="max_output_tokens")
    tools = function_tools(body)
    fmt, grammar = text_format(body)
    new = input_messages(body)
    previous = body.text("previous_response_id")
    store = store_of(request)
    history = conversation(store, previous) if previous else []
    instructions = body.text("instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    draft = Draft(body, tools, fmt, params)  # every field is checked before a load
    choice = chat_tool_choice(body)
    wanted = TurnInput(system + history + new, tools.chat or None, choice, grammar,
                       "text.format", response_format=chat_response_format(fmt),
                       input_grammar=tools.forced_input(choice))
    # from here on, only the turn's own end may end the request
    draft.model, turn = await open_turn(request, body, wanted, params)

    def on_final(finished: Finished) -> dict[str, Any]:
        final = draft.final(turn.blocks.all, finished, turn.reasoning_tokens)
        if draft.echo["store"]:
            messages = new + [assistant_message(turn.blocks.all)]
            store.put(final["id"], Stored(final, messages, previous))
        return final

    if draft.stream:
        return sse_stream(EventStream(draft, turn, on_final).run(), turn.close)
    return JSONResponse(on_final(await turn.whole()))


async def one(request: Request) -> Any:
    """GET or DELETE a stored response."""
    response_id = request.path_params["response_id"]
    store = store_of(request)
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"No response found with id '{shorten(response_id)}'.",
                       param="response_id", code="response_not_found")
    if request.method == "DELETE":
        store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted",
                             "deleted": True})
    return JSONResponse(stored.response)
