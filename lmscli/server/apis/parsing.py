"""Request parsing shared by every API surface: bodies, sampling fields, messages, grammars
and the model a request names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from starlette.requests import Request

from lmscli.engine import DraftModel
from lmscli.prompting.grammar import SchemaError, any_json_grammar, json_schema_grammar
from lmscli.server.body import Body, parse_json
from lmscli.server.errors import bad_request, shorten
from lmscli.server.models import ModelManager, check_draft_range, find_draft
from lmscli.server.pipeline.tooluse import check_message_tool_fields, parse_tool_choice, parse_tools
from lmscli.server.pipeline.turns import RequestParams, TurnInput
from lmscli.server.state import app_state

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOPS = 32
MAX_STOP_CHARS = 1000
INT32_MAX = 2**31 - 1  # counts that reach llama.cpp as C ints
SPECULATIVE = ("off", "ngram")
# the draft settings a load and a request both take
DRAFT_FIELDS = ("draft_model", "draft_max_tokens", "draft_min_tokens")
# OpenAI fields we don't implement, with the value that asks for nothing: any other value is a
# 400, so that a client never believes it got what it asked for.
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},),
               "echo": (False,), "best_of": (1,), "suffix": ("",)}


async def read_json(request: Request) -> Body:
    return Body(parse_json(await request.body()))


def manager(request: Request) -> ModelManager:
    return app_state(request).models


def sampling(body: Body, *, limit_key: str | None = None, stop_key: str = "stop"
             ) -> RequestParams:
    """The sampling fields, and speculative decoding (``speculative``, ``draft_model``,
    ``draft_max_tokens``, ``draft_min_tokens``); ``limit_key`` and ``stop_key`` name the
    token limit and the stop strings where an API calls them otherwise (max_output_tokens,
    stop_sequences)."""
    reject_unsupported(body)
    p = RequestParams()
    p.temperature = body.number("temperature", p.temperature, low=0, high=2)  # type: ignore
    p.top_p = body.number("top_p", p.top_p, low=0, high=1)  # type: ignore[assignment]
    p.top_k = body.integer("top_k", p.top_k, low=0, high=INT32_MAX)  # type: ignore[assignment]
    p.min_p = body.number("min_p", p.min_p, low=0, high=1)  # type: ignore[assignment]
    p.repeat_penalty = body.number("repeat_penalty", p.repeat_penalty, low=0,  # type: ignore
                                   high=100)
    for key in ("presence_penalty", "frequency_penalty"):
        setattr(p, key, body.number(key, 0.0, low=-2, high=2))
    seed = body.integer("seed")
    # llama.cpp seeds are 32-bit; -1 becomes 0xFFFFFFFF, which llama.cpp reads as "random"
    p.seed = None if seed is None else seed % 2**32
    p.max_tokens = max_tokens(body, limit_key)
    p.stop = stop_strings(body, stop_key)
    if body.integer("n", 1) != 1:
        raise bad_request("Only n=1 is supported: this server returns one choice.", "n")
    p.speculative = speculative_mode(body)
    p.draft_model = draft_model(body)
    p.draft_max, p.draft_min = draft_lengths(body)
    return p


def speculative_mode(body: Body) -> Literal["off", "ngram"] | None:
    """``speculative``: "off" or "ngram"; None (not given) keeps the model's load setting."""
    value = body.data.get("speculative")
    if value is None or value in SPECULATIVE:
        return value
    where = field_name(body, "speculative")
    raise bad_request(f"Field '{where}' must be \"off\" or \"ngram\".", where)


def draft_model(body: Body) -> DraftModel | None:
    """LM Studio's ``draft_model``: a downloaded model's key, found before any load (an
    unknown one shouldn't cost a load). An empty key asks for none, as in LM Studio."""
    name = body.get("draft_model", str)
    return find_draft(name, field_name(body, "draft_model")) if name else None


def draft_lengths(body: Body) -> tuple[int | None, int | None]:
    """``draft_max_tokens`` and ``draft_min_tokens`` (LM Studio's numDraftTokensExact and
    minDraftLengthToConsider): the most tokens a draft has, and the fewest worth verifying;
    None where not given. A load's and a request's take the same values."""
    most = body.integer("draft_max_tokens", low=1, high=INT32_MAX)
    least = body.integer("draft_min_tokens", low=0, high=INT32_MAX)
    check_draft_range(most, least, (field_name(body, "draft_max_tokens"),
                                    field_name(body, "draft_min_tokens")))
    return most, least


def load_drafting(body: Body) -> dict[str, Any]:
    """A load's ``draft_model``, ``draft_max_tokens`` and ``draft_min_tokens``, as
    ``ModelManager.load``'s keywords."""
    most, least = draft_lengths(body)
    return {"draft_model": draft_model(body), "draft_max": most, "draft_min": least or 0}


def field_name(body: Body, key: str) -> str:
    """``key`` as the caller wrote it: inside the object ``body`` came from, if any."""
    return f"{body.prefix}.{key}" if body.prefix else key


def reject_unsupported(body: Body) -> None:
    for key, harmless in UNSUPPORTED.items():
        value = body.data.get(key)
        if value is None or any(value == h and type(value) is type(h) for h in harmless):
            continue
        raise bad_request(f"'{key}' is not supported by this server; leave it out.", key,
                          "unsupported_parameter")


def max_tokens(body: Body, key: str | None = None) -> int | None:
    """The token limit: None for none (a negative value, as LM Studio's -1)."""
    if key is None:
        key = "max_completion_tokens" if "max_completion_tokens" in body.data else "max_tokens"
    value = body.integer(key, high=INT32_MAX)
    if value == 0:
        where = f"{body.prefix}.{key}" if body.prefix else key
        raise bad_request(f"'{where}' must be at least 1 (or -1 for no limit).", where)
    return None if value is None or value < 0 else value


def stop_strings(body: Body, key: str = "stop") -> list[str]:
    stop = body.get(key, (str, list))
    stops = [stop] if isinstance(stop, str) else stop or []
    if not all(isinstance(s, str) for s in stops):
        raise bad_request(f"Field '{key}' must be a string or an array of strings.", key)
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"Field '{key}' takes at most {MAX_STOPS} strings of at most "
                          f"{MAX_STOP_CHARS} characters.", key)
    return stops


def message_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_request(f"'{where}[{i}]' must be a text part "
                                  '({"type": "text", "text": "..."}); images are not supported.',
                                  f"{where}[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"'{where}' must be a string or an array of text parts.", where)


def parse_messages(body: Body) -> list[dict[str, Any]]:
    messages = body.get("messages", list, required=True)
    if not messages:
        raise bad_request("Field 'messages' must not be empty.", "messages")
    out = []
    for i, raw in enumerate(messages):
        msg = Body(raw, f"messages[{i}]")
        role = msg.get("role", str, required=True)
        if role not in ROLES:
            raise bad_request(f"'messages[{i}].role' must be one of "
                              f"{', '.join(sorted(ROLES))}.", f"messages[{i}].role")
        content = message_text(raw.get("content"), f"messages[{i}].content")
        message = {"role": "system" if role == "developer" else role, "content": content}
        check_message_tool_fields(raw, i, message)
        out.append(message)
    return out


def response_grammar(body: Body) -> str | None:
    """GBNF for OpenAI's ``response_format`` (json_schema or json_object), else None."""
    fmt = body.get("response_format", dict)
    if fmt is None:
        return None
    spec = Body(fmt, "response_format")
    return format_grammar(spec, lambda: Body(spec.get("json_schema", dict, required=True),
                                             "response_format.json_schema"))


def format_grammar(spec: Body, schema_in: Callable[[], Body] | None = None) -> str | None:
    """GBNF for a structured-output format: ``text`` (none), ``json_object`` or
    ``json_schema``, whose ``schema`` is in ``schema_in()`` (chat's ``response_format`` nests
    it) or in the format itself (Responses' ``text.format``)."""
    kind = spec.get("type", str, required=True)
    if kind == "text":
        return None
    if kind == "json_object":
        return any_json_grammar()
    if kind != "json_schema":
        raise bad_request(f"'{spec.prefix}.type' must be text, json_object or json_schema.",
                          f"{spec.prefix}.type")
    holder = schema_in() if schema_in else spec
    return schema_grammar(holder.get("schema", dict, required=True), f"{holder.prefix}.schema")


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """GBNF for a JSON schema the caller sent at ``where``; one we can't convert is a 400."""
    try:
        return json_schema_grammar(schema, where)
    except SchemaError as exc:
        raise bad_request(f"Unsupported JSON schema: {shorten(str(exc), 500)}", where,
                          "invalid_schema") from None


def raw_input(prompt: str, body: Body) -> TurnInput:
    """Text to complete as it is (text completions, ``lms.llm().complete()``)."""
    if not prompt:
        raise bad_request("Field 'prompt' must not be empty: there is nothing to complete.",
                          "prompt")
    return TurnInput([], schema_grammar=response_grammar(body), prompt=prompt)


def chat_input(body: Body, schema_param: str = "response_format") -> TurnInput:
    """An OpenAI chat body (chat completions, /api/v0, lmscli's and the SDK's predictions)
    as a turn, checked before any load: messages, tools, tool_choice, response_format."""
    tools = parse_tools(body)
    parse_tool_choice(body, tools)
    return TurnInput(parse_messages(body), tools, body.data.get("tool_choice"),
                     response_grammar(body), schema_param)
