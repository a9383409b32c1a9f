"""The SDK's requests read into lmscli's own request fields.

A prediction arrives as a chat history plus a KV config stack (``llm.prediction.*``); it is
turned into the OpenAI-shaped body that ``apis/parsing.py`` already validates (sampling
fields, messages, tools, ``response_format``), so the websocket, /v1 and /api/v0 accept and
refuse exactly the same values. A load arrives as ``llm.load.*`` / ``embedding.load.*``.
Keys lmscli has no use for are ignored, as LM Studio ignores keys it doesn't know.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lmscli.engine import DraftModel, LoadOptions, SamplingParams
from lmscli.server.body import Body
from lmscli.server.errors import bad_request
from lmscli.server.models import MAX_PARALLEL, Loaded, check_draft_range, find_draft

P = "llm.prediction."
INT32_MAX = 2**31 - 1  # draft lengths reach llama.cpp as C ints
SPECULATIVE = P + "speculativeDecoding."
LOAD_SPECULATIVE = "llm.load.speculativeDecoding."
COMPLETE_LAYER = "completeModeFormatting"  # the SDK's complete(): the raw prompt, no template


@dataclass
class Stack:
    """A collapsed KVConfigStack: later layers override earlier ones."""

    values: dict[str, Any] = field(default_factory=dict)
    layers: set[str] = field(default_factory=set)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> Any:
        return self.values.get(key)


def collapse(stack: Any, where: str) -> Stack:
    out = Stack()
    if stack is None:
        return out
    layers = Body(stack, where).get("layers", list, [])
    for i, raw in enumerate(layers):
        layer = Body(raw, f"{where}.layers[{i}]")
        out.layers.add(layer.get("layerName", str, ""))
        config = Body(layer.get("config", dict, {}), f"{where}.layers[{i}].config")
        for j, item in enumerate(config.get("fields", list, [])):
            kv = Body(item, f"{where}.layers[{i}].config.fields[{j}]")
            out.values[kv.get("key", str, required=True)] = item.get("value")
    return out


# -- predictions ----------------------------------------------------------------------------

@dataclass
class PredictionConfig:
    """What a ``predict`` channel asked for, as lmscli request fields."""

    body: dict[str, Any]  # OpenAI-shaped: messages, sampling fields, tools, response_format
    raw_prompt: bool = False  # complete(): the messages' text is the prompt
    echo: list[dict[str, Any]] = field(default_factory=list)  # honoured fields, sent back


def prediction_config(stack: Stack, history: Any) -> PredictionConfig:
    body: dict[str, Any] = {"messages": history_messages(history)}
    config = PredictionConfig(body, raw_prompt=COMPLETE_LAYER in stack.layers)
    _sampling(stack, body)
    _speculative(stack, config)
    _draft_limits(stack, config)
    _structured(stack, config)
    _tools(stack, config)
    return config


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise bad_request(f"'{key}' must be a finite number.", key)
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past what a float holds
        return False


def _checkbox(value: Any, key: str) -> tuple[bool, Any]:
    """LM Studio's ``{"checked": bool, "value": x}``; a bare value counts as checked."""
    if isinstance(value, dict):
        checked = value.get("checked", True)
        if not isinstance(checked, bool):
            raise bad_request(f"'{key}.checked' must be a boolean.", key)
        return checked and value.get("value") is not False, value.get("value")
    return value is not False, value


def _sampling(stack: Stack, body: dict[str, Any]) -> None:
    """Into the body's OpenAI fields; ``parsing.sampling`` checks the ranges."""
    if (t := stack.get(P + "temperature")) is not None:
        body["temperature"] = _number(t, P + "temperature")
    if (key := P + "maxPredictedTokens") in stack:
        on, value = _checkbox(stack.get(key), key)
        if on and value is not None:
            body["max_tokens"] = int(_number(value, key))
    if (k := stack.get(P + "topKSampling")) is not None:
        body["top_k"] = max(0, int(_number(k, P + "topKSampling")))  # ≤0: off, as llama.cpp
    for name, field_, off in (("topPSampling", "top_p", 1.0), ("minPSampling", "min_p", 0.0),
                              ("repeatPenalty", "repeat_penalty", 1.0)):
        if (key := P + name) in stack:
            on, value = _checkbox(stack.get(key), key)
            body[field_] = _number(value, key) if on and value is not None else off
    if (stops := stack.get(P + "stopStrings")) is not None:
        body["stop"] = stops


def _speculative(stack: Stack, config: PredictionConfig) -> None:
    """``speculativeDecoding.mode`` (lmscli's: "off" or "ngram") and LM Studio's
    ``speculativeDecoding.draftModel``, into the body's ``speculative`` and ``draft_model``
    (``parsing.sampling`` finds the draft model)."""
    key = SPECULATIVE + "mode"
    if (mode := stack.get(key)) is not None:
        if mode not in ("off", "ngram"):
            raise bad_request(f"'{key}' must be \"off\" or \"ngram\".", key)
        config.body["speculative"] = mode
        config.echo.append({"key": key, "value": mode})
    key = SPECULATIVE + "draftModel"
    if (draft := _model_key(stack, key)) is not None:
        config.body["draft_model"] = draft
        config.echo.append({"key": key, "value": draft})


def _draft_limits(stack: Stack, config: PredictionConfig) -> None:
    """LM Studio's ``speculativeDecoding.{numDraftTokensExact,minDraftLengthToConsider}``,
    into the body's ``draft_max_tokens`` and ``draft_min_tokens``."""
    most, least = _draft_lengths(stack, SPECULATIVE)
    for name, body_key, value in (("numDraftTokensExact", "draft_max_tokens", most),
                                  ("minDraftLengthToConsider", "draft_min_tokens", least)):
        if value is not None:
            config.body[body_key] = value
            config.echo.append({"key": SPECULATIVE + name, "value": value})


def _structured(stack: Stack, config: PredictionConfig) -> None:
    key = P + "structured"
    value = stack.get(key)
    if value is None:
        return
    spec = Body(value, key)
    kind = spec.get("type", str, required=True)
    if kind == "json":
        schema = spec.get("jsonSchema", dict, required=True)
        config.body["response_format"] = {"type": "json_schema",
                                          "json_schema": {"schema": schema}}
    elif kind == "gbnf":
        # a grammar no token can satisfy aborts llama.cpp; lmscli writes its grammars itself
        raise bad_request(f"'{key}': raw GBNF grammars are not accepted; pass a JSON schema "
                          '({"type": "json", "jsonSchema": ...}) instead.', key)
    elif kind != "none":
        raise bad_request(f"'{key}.type' must be json, gbnf or none.", key)
    config.echo.append({"key": key, "value": value})


def _tools(stack: Stack, config: PredictionConfig) -> None:
    key = P + "tools"
    value = stack.get(key)
    if value is None:
        return
    spec = Body(value, key)
    kind = spec.get("type", str, required=True)
    if kind == "toolArray":
        config.body["tools"] = spec.get("tools", list, [])
        if spec.get("force", bool, False):
            config.body["tool_choice"] = "required"
    elif kind != "none":
        raise bad_request(f"'{key}.type' must be toolArray or none.", key)
    config.echo.append({"key": key, "value": value})


def sampling_fields(params: SamplingParams) -> list[dict[str, Any]]:
    """The sampling a prediction ran with, as the KV fields of its ``predictionConfig``."""
    return [
        {"key": P + "temperature", "value": params.temperature},
        {"key": P + "maxPredictedTokens", "value": {"checked": params.max_tokens is not None,
                                                    "value": params.max_tokens or -1}},
        {"key": P + "topKSampling", "value": float(params.top_k)},
        {"key": P + "topPSampling", "value": {"checked": True, "value": params.top_p}},
        {"key": P + "minPSampling", "value": {"checked": True, "value": params.min_p}},
        {"key": P + "repeatPenalty", "value": {"checked": True, "value": params.repeat_penalty}},
        {"key": P + "stopStrings", "value": list(params.stop)},
    ]


# -- chat histories -------------------------------------------------------------------------

def history_messages(history: Any) -> list[dict[str, Any]]:
    """ChatHistoryData as OpenAI-shaped messages (``parsing.parse_messages`` checks them):
    an assistant's toolCallRequest parts become ``tool_calls``, a tool message's results one
    ``tool`` message each."""
    messages = Body(history, "history").get("messages", list, required=True)
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(messages):
        where = f"history.messages[{i}]"
        message = Body(raw, where)
        role = message.get("role", str, required=True)
        content = message.get("content", (str, list), [])
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if role == "tool":
            out.extend(_tool_results(parts, where))
        else:
            out.append(_message(role, parts, where))
    return out


def _message(role: str, parts: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, raw in enumerate(parts):
        part = Body(raw, f"{where}.content[{j}]")
        kind = part.get("type", str, required=True)
        if kind == "text":
            texts.append(part.get("text", str, ""))
        elif kind == "toolCallRequest" and role == "assistant":
            calls.append(_call(part.get("toolCallRequest", dict, required=True),
                               f"{where}.content[{j}].toolCallRequest"))
        elif kind == "file":
            raise bad_request(f"'{where}.content[{j}]' is a file: lmscli's models take text "
                              "only (no images or documents).", f"{where}.content[{j}]")
        else:
            raise bad_request(f"'{where}.content[{j}].type' {kind!r} is not allowed in a "
                              f"{role} message.", f"{where}.content[{j}].type")
    message: dict[str, Any] = {"role": role, "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _call(raw: dict[str, Any], where: str) -> dict[str, Any]:
    call = Body(raw, where)
    arguments = call.get("arguments", dict, {})
    return {"id": call.get("id", str, ""), "type": "function",
            "function": {"name": call.get("name", str, required=True),
                         "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _tool_results(parts: list[Any], where: str) -> list[dict[str, Any]]:
    out = []
    for j, raw in enumerate(parts):
        part = Body(raw, f"{where}.content[{j}]")
        if part.get("type", str, required=True) != "toolCallResult":
            raise bad_request(f"'{where}.content[{j}]' must be a toolCallResult.",
                              f"{where}.content[{j}].type")
        out.append({"role": "tool", "content": part.get("content", str, ""),
                    "tool_call_id": part.get("toolCallId", str)})
    return out


# -- loads ----------------------------------------------------------------------------------

@dataclass
class LoadConfig:
    context_length: int | None = None
    gpu_ratio: float | None = None
    parallel: int | None = None
    draft_model: DraftModel | None = None
    draft_max: int | None = None
    draft_min: int = 0

    def drafting(self) -> dict[str, Any]:
        """The draft settings, as ``ModelManager.load``'s keywords."""
        return {"draft_model": self.draft_model, "draft_max": self.draft_max,
                "draft_min": self.draft_min}


def load_config(stack: Stack, domain: str) -> LoadConfig:
    prefix = f"{domain}.load."
    out = LoadConfig()
    if (ctx := stack.get(prefix + "contextLength")) is not None:
        out.context_length = _whole(ctx, prefix + "contextLength", 1, 2**31 - 1)
    if (ratio := stack.get(prefix + "llama.acceleration.offloadRatio")) is not None:
        if ratio == "max":
            ratio = 1.0
        elif ratio == "off":
            ratio = 0.0
        out.gpu_ratio = _number(ratio, prefix + "llama.acceleration.offloadRatio")
        if not 0 <= out.gpu_ratio <= 1:
            raise bad_request(f"'{prefix}llama.acceleration.offloadRatio' must be between 0 "
                              "and 1.", "offloadRatio")
    if (parallel := stack.get(prefix + "numParallelSessions")) is not None:
        out.parallel = _whole(parallel, prefix + "numParallelSessions", 1, MAX_PARALLEL)
    if domain == "llm":
        _load_drafting(stack, out)
    return out


def _load_drafting(stack: Stack, out: LoadConfig) -> None:
    """``llm.load.speculativeDecoding.{draftModel,numDraftTokensExact,
    minDraftLengthToConsider}``: the draft model, the most and the fewest tokens a draft
    has (the names of LM Studio's prediction keys for the same limits)."""
    most, least = _draft_lengths(stack, LOAD_SPECULATIVE)
    out.draft_max, out.draft_min = most, least or 0
    key = LOAD_SPECULATIVE + "draftModel"
    if (draft := _model_key(stack, key)) is not None:
        out.draft_model = find_draft(draft, key) if draft else None


def _model_key(stack: Stack, key: str) -> str | None:
    """A draft model's key at ``key`` (a load's or a prediction's), None when not given."""
    draft = stack.get(key)
    if draft is not None and not isinstance(draft, str):
        raise bad_request(f"'{key}' must be a model key (a string).", key)
    return draft


def _draft_lengths(stack: Stack, prefix: str) -> tuple[int | None, int | None]:
    """``{prefix}numDraftTokensExact`` and ``{prefix}minDraftLengthToConsider`` (a load's
    and a prediction's keys alike): the most and the fewest tokens a draft has; None where
    not given."""
    most_key, least_key = prefix + "numDraftTokensExact", prefix + "minDraftLengthToConsider"
    most, least = stack.get(most_key), stack.get(least_key)
    most = None if most is None else _whole(most, most_key, 1, INT32_MAX)
    least = None if least is None else _whole(least, least_key, 0, INT32_MAX)
    check_draft_range(most, least, (most_key, least_key))
    return most, least


def _whole(value: Any, key: str, low: int, high: int) -> int:
    number = _number(value, key)
    if number != int(number) or not low <= number <= high:
        raise bad_request(f"'{key}' must be a whole number between {low} and {high}.", key)
    return int(number)


def load_fields(entry: Loaded, domain: str) -> list[dict[str, Any]]:
    """A loaded model's settings as the KV fields of ``getLoadConfig`` / ``loadModelConfig``."""
    fields: list[dict[str, Any]] = [
        {"key": f"{domain}.load.contextLength", "value": entry.instance.context_length}]
    ratio = entry.instance.options.gpu_ratio
    if ratio is not None:
        fields.append({"key": f"{domain}.load.llama.acceleration.offloadRatio", "value": ratio})
    if domain == "llm":
        fields.append({"key": "llm.load.numParallelSessions", "value": entry.instance.parallel})
        fields += _drafting_fields(entry.instance.options)
    return fields


def _drafting_fields(options: LoadOptions) -> list[dict[str, Any]]:
    """The draft settings a load asked for, as the KV fields it could send them in."""
    values = {"draftModel": options.draft_model.model_key if options.draft_model else None,
              "numDraftTokensExact": options.draft_max,
              "minDraftLengthToConsider": options.draft_min or None}
    return [{"key": LOAD_SPECULATIVE + name, "value": value}
            for name, value in values.items() if value is not None]
