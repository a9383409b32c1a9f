"""Anthropic's Messages API: ``POST /v1/messages`` (whole or streamed) and
``POST /v1/messages/count_tokens``. Errors on these paths take Anthropic's shape (errors.py)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lmscli.engine import PredictionStats
from lmscli.server.apis.parsing import read_json, sampling, schema_grammar
from lmscli.server.body import Body
from lmscli.server.errors import bad_request, shorten
from lmscli.server.links.linked import estimate_tokens
from lmscli.server.pipeline.local import count_tokens, model_for, open_turn, prepare
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
    chat_response_format,
)
from lmscli.server.state import app_state
from lmscli.server.streams import sse_event, sse_stream

STOP_REASONS = {"eosFound": "end_turn", "stopStringFound": "stop_sequence",
                "maxPredictedTokensReached": "max_tokens",
                "contextLengthReached": "model_context_window_exceeded",
                "toolCalls": "tool_use", "userStopped": "end_turn", "modelUnloaded": "end_turn",
                "failed": "end_turn"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}
SKIPPED_BLOCKS = {"thinking", "redacted_thinking"}  # earlier reasoning: templates drop it
# Claude Code's first system block: an account header whose value changes between sessions
# (and, in some releases, every request). It means nothing to a model, and first in the prompt
# it would put the whole system prompt and tool list after it out of the prompt cache's reach.
BILLING_HEADER = "x-anthropic-billing-header:"


# -- the request -----------------------------------------------------------------------------

def turn_input(body: Body) -> TurnInput:
    """``system``, ``messages``, ``tools``, ``tool_choice`` and the output format in chat
    terms; a last assistant message with only text is a prefill that the answer continues."""
    messages = chat_messages(body)
    system = _text(body.data.get("system"), "system")
    if system:
        messages.insert(0, {"role": "system", "content": system})
    prefill = ""
    last = messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        prefill = messages.pop()["content"]
    tools = chat_tools(body)
    fmt, where = output_format(body)
    grammar = schema_grammar(fmt["schema"], f"{where}.schema") if fmt else None
    return TurnInput(messages, tools, chat_tool_choice(body, tools), grammar, where, prefill,
                     chat_response_format(fmt))


def chat_messages(body: Body) -> list[dict[str, Any]]:
    raw = body.get("messages", list, required=True)
    if not raw:
        raise bad_request("Field 'messages' must not be empty.", "messages")
    out: list[dict[str, Any]] = []
    for i, data in enumerate(raw):
        message = Body(data, f"messages[{i}]")
        role = message.get("role", str, required=True)
        content = message.get("content", (str, list), required=True)
        where = f"messages[{i}].content"
        if not content and isinstance(content, list):
            raise bad_request(f"'{where}' must not be an empty array.", where)
        if role == "user":
            out += _user_turn(content, where)
        elif role == "assistant":
            out.append(_assistant_turn(content, where))
        elif role == "system":
            # Claude Code sends these mid-conversation (its agent and skill lists); the
            # template renders them in place, or the prompt builder folds them into a user turn
            out.append({"role": "system", "content": _text(content, where)})
        else:
            raise bad_request(f"'messages[{i}].role' must be user, assistant or system.",
                              f"messages[{i}].role")
    return out


def _blocks(content: str | list[Any], where: str) -> list[Body]:
    if isinstance(content, str):
        return [Body({"type": "text", "text": content}, where)]
    return [Body(b, f"{where}[{j}]") for j, b in enumerate(content)]


def _user_turn(content: str | list[Any], where: str) -> list[dict[str, Any]]:
    """Tool results as tool messages (they answer the previous turn), then the text."""
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in _blocks(content, where):
        kind = block.get("type", str, required=True)
        if kind == "text":
            texts.append(block.get("text", str, required=True))
        elif kind == "tool_result":
            text = _text(block.data.get("content"), f"{block.prefix}.content")
            if block.get("is_error", bool, False):
                text = f"Error: {text}"
            results.append({"role": "tool", "content": text,
                            "tool_call_id": block.get("tool_use_id", str, required=True)})
        else:
            raise _unsupported_block(kind, block.prefix, "text and tool_result")
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def _assistant_turn(content: str | list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in _blocks(content, where):
        kind = block.get("type", str, required=True)
        if kind == "text":
            texts.append(block.get("text", str, required=True))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input", dict, {}), ensure_ascii=False)
            calls.append({"id": block.get("id", str, required=True), "type": "function",
                          "function": {"name": block.get("name", str, required=True),
                                       "arguments": arguments}})
        elif kind not in SKIPPED_BLOCKS:
            raise _unsupported_block(kind, block.prefix, "text and tool_use")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined (system prompts, tool results)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of text blocks.", where)
    texts = []
    for block in _blocks(content, where):
        kind = block.get("type", str, required=True)
        if kind != "text":
            raise _unsupported_block(kind, block.prefix, "text")
        text = block.get("text", str, required=True)
        if not (where == "system" and text.startswith(BILLING_HEADER)):
            texts.append(text)
    return "\n".join(texts) if where == "system" else "".join(texts)


def _unsupported_block(kind: str, where: str, allowed: str) -> Exception:
    return bad_request(f"'{where}' is a {shorten(kind)!r} block; this server takes {allowed} "
                       "blocks here.", f"{where}.type")


def chat_tools(body: Body) -> list[dict[str, Any]] | None:
    tools = []
    for i, raw in enumerate(body.get("tools", list, [])):
        tool = Body(raw, f"tools[{i}]")
        kind = tool.get("type", str, "custom")
        if kind != "custom":
            raise bad_request(f"'tools[{i}].type' {shorten(kind)!r} is a server tool, which "
                              "this server does not run; define it as a custom tool.",
                              f"tools[{i}].type")
        tools.append(function_tool(check_tool_name(tool), tool.get("description", str),
                                   tool.get("input_schema", dict, required=True)))
    return tools or None


def chat_tool_choice(body: Body, tools: list[dict[str, Any]] | None
                     ) -> str | dict[str, Any] | None:
    raw = body.get("tool_choice", dict)
    if raw is None:
        return None
    choice = Body(raw, "tool_choice")
    kind = choice.get("type", str, required=True)
    if kind not in (*CHOICES, "tool"):
        raise bad_request("'tool_choice.type' must be auto, any, tool or none.",
                          "tool_choice.type")
    if kind in ("any", "tool") and not tools:
        raise bad_request(f'tool_choice "{kind}" needs \'tools\'.', "tool_choice")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", str,
                                                                    required=True)}}
    return CHOICES[kind]


def output_format(body: Body) -> tuple[dict[str, Any] | None, str]:
    """Structured output: ``output_config.format`` (or the older ``output_format``), checked,
    and where it was found."""
    config = Body(body.get("output_config", dict, {}), "output_config")
    where = "output_config.format"
    fmt = config.get("format", dict)
    if fmt is None and body.data.get("output_format") is not None:
        where, fmt = "output_format", body.get("output_format", dict)
    if fmt is None:
        return None, where
    spec = Body(fmt, where)
    if spec.get("type", str, required=True) != "json_schema":
        raise bad_request(f"'{where}.type' must be json_schema.", f"{where}.type")
    spec.get("schema", dict, required=True)
    return fmt, where


def params_of(body: Body) -> Any:
    limit = body.get("max_tokens", int, required=True)
    if limit < 1:
        raise bad_request("Field 'max_tokens' must be at least 1.", "max_tokens")
    return sampling(body, limit_key="max_tokens", stop_key="stop_sequences")


# -- the response ----------------------------------------------------------------------------

def usage(prompt: int, cached: int, output: int) -> dict[str, Any]:
    # Anthropic counts the prompt in parts: input_tokens is what was not read from the cache
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output}


def stop_fields(stats: PredictionStats) -> dict[str, Any]:
    return {"stop_reason": STOP_REASONS[stats.stop_reason],
            "stop_sequence": stats.stop_string if stats.stop_reason == "stopStringFound"
            else None}


def content_block(block: Block) -> dict[str, Any]:
    if block.kind == "text":
        return {"type": "text", "text": block.text}
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": block.text, "signature": ""}
    return {"type": "tool_use", "id": block.call_id, "name": block.name,
            "input": block.arguments}


class MessageReply:
    """One message: the whole body, or Anthropic's event sequence."""

    def __init__(self, model: str, turn: AnyTurn) -> None:
        self.id = "msg_" + secrets.token_hex(12)
        self.model, self.turn = model, turn

    def message(self, content: list[dict[str, Any]], stop: dict[str, Any],
                counts: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content} | stop | {"usage": counts}

    def whole(self, finished: Finished) -> dict[str, Any]:
        stats = finished.stats
        return self.message([content_block(b) for b in self.turn.blocks.all],
                            stop_fields(stats),
                            usage(stats.prompt_tokens, stats.cached_tokens,
                                  stats.predicted_tokens))

    async def events(self) -> AsyncIterator[bytes]:
        turn = self.turn
        start = self.message([], {"stop_reason": None, "stop_sequence": None},
                             usage(turn.prompt_tokens, turn.cached_tokens, 0))
        yield sse_event("message_start", {"type": "message_start", "message": start})
        yield sse_event("ping", {"type": "ping"})
        async for event in turn.stream():
            if isinstance(event, Finished):
                for chunk in self._end(event.stats):
                    yield chunk
            elif isinstance(event, Failure):
                yield sse_event("error", {"type": "error", "error": {
                    "type": "api_error", "message": f"Prediction failed: {event.message}"}})
            elif isinstance(event, Opened | Grew | Closed):
                yield self._block_event(event)

    def _block_event(self, event: Opened | Grew | Closed) -> bytes:
        block = event.block
        if isinstance(event, Opened):
            # empty: the block's text so far (already in ``block``) follows as deltas
            start = content_block(Block(block.index, block.kind, call_id=block.call_id,
                                        name=block.name))
            return sse_event("content_block_start", {"type": "content_block_start",
                                                     "index": block.index,
                                                     "content_block": start})
        if isinstance(event, Grew):
            return sse_event("content_block_delta", {"type": "content_block_delta",
                                                     "index": block.index,
                                                     "delta": _delta(block, event.text)})
        return sse_event("content_block_stop", {"type": "content_block_stop",
                                                "index": block.index})

    def _end(self, stats: PredictionStats) -> list[bytes]:
        counts = usage(stats.prompt_tokens, stats.cached_tokens, stats.predicted_tokens)
        return [sse_event("message_delta", {"type": "message_delta",
                                            "delta": stop_fields(stats), "usage": counts}),
                sse_event("message_stop", {"type": "message_stop"})]


def _delta(block: Block, text: str) -> dict[str, Any]:
    if block.kind == "call":
        return {"type": "input_json_delta", "partial_json": text}
    if block.kind == "reasoning":
        return {"type": "thinking_delta", "thinking": text}
    return {"type": "text_delta", "text": text}


# -- handlers --------------------------------------------------------------------------------

async def messages(request: Request) -> Any:
    body = await read_json(request)
    wanted = turn_input(body)
    params = params_of(body)  # before a load: a bad field shouldn't cost one
    stream = body.get("stream", bool, False)
    # from here on, only the turn's own end may end the request
    model, turn = await open_turn(request, body, wanted, params, call_id_prefix="toolu_")
    reply = MessageReply(model, turn)
    if stream:
        return sse_stream(reply.events(), turn.close)
    return JSONResponse(reply.whole(await turn.whole()))


async def count_tokens_route(request: Request) -> Any:
    body = await read_json(request)
    wanted = turn_input(body)
    if app_state(request).linked.target(body.data.get("model")) is not None:
        # an upstream can't count a prompt without running it: an estimate, for budgets
        return JSONResponse({"input_tokens": estimate_tokens(wanted)})
    entry = await model_for(request, body)
    return JSONResponse({"input_tokens": await count_tokens(await prepare(entry, wanted))})
