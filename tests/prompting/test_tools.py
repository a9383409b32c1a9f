"""Tool use: format detection, prompts and message conversion, call grammars, the call parser."""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from lmscli.prompting.template import CHATML, render_chat
from lmscli.prompting.tools import (
    CallArgs,
    CallEnd,
    CallStart,
    ContentDelta,
    ParseEvent,
    ToolCallParser,
    ToolFormat,
    _wrap_grammar,
    call_grammar,
    default_system_prompt,
    detect_format,
    prepare_chat,
)
from tests.doc_tools import SEARCH_PRODUCTS
from tests.gguf_factory import TOOLS_TEMPLATE, make_gguf

FORMATS: list[ToolFormat] = ["default", "hermes", "llama3", "mistral"]

# -- templates that look like the real ones (abridged) --------------------------------------

QWEN25_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nReturn a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {%- set tool_call = tool_call.function %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

LLAMA31_TEMPLATE = """\
{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
        {%- if builtin_tools is defined %}{{- "<|eom_id|>" }}{%- else %}{{- "<|eot_id|>" }}{%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if builtin_tools is defined %}{{- "<|python_tag|>" }}{%- endif %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""  # noqa: E501

MISTRAL_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {%- if tools is not none and loop.last %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message.content + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {{- {"name": tool_call.function.name, "arguments": tool_call.function.arguments} | tojson }}
        {%- endfor %}
        {{- "]" + eos_token }}
    {%- elif message.role == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + "}[/TOOL_RESULTS]" }}
    {%- else %}
        {{- " " + message.content + eos_token }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501


def test_detect_format_on_real_looking_templates() -> None:
    assert detect_format(CHATML) == "default"
    assert detect_format(QWEN25_TEMPLATE) == "hermes"
    assert detect_format(LLAMA31_TEMPLATE) == "llama3"
    assert detect_format(MISTRAL_TEMPLATE) == "mistral"
    assert detect_format(None) == "default"
    assert detect_format("") == "default"


def test_detect_format_needs_tools_in_the_template_and_a_known_format() -> None:
    # Renders tools, but in no format we can parse: default support.
    assert detect_format(TOOLS_TEMPLATE) == "default"
    # Mentions <tool_call> but never looks at `tools`: the model wouldn't see them.
    assert detect_format(CHATML + "{# <tool_call> #}") == "default"
    assert detect_format("{% if tools %}<|eom_id|>{% endif %}") == "llama3"


# -- the default system prompt ---------------------------------------------------------------

DELIVERY_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_delivery_date",
        "description": "Get the delivery date for a customer's order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}

# Copied from the docs' `lms log stream` example (Gemma 2), inside the model's system turn.
DOCS_SYSTEM_PROMPT = """\
You are a tool-calling AI. You can request calls to available tools with this EXACT format:
[TOOL_REQUEST]{"name": "tool_name", "arguments": {"param1": "value1"}}[END_TOOL_REQUEST]

AVAILABLE TOOLS:
{
  "type": "toolArray",
  "tools": [
    {
      "type": "function",
      "function": {
        "name": "get_delivery_date",
        "description": "Get the delivery date for a customer's order",
        "parameters": {
          "type": "object",
          "properties": {
            "order_id": {
              "type": "string"
            }
          },
          "required": [
            "order_id"
          ]
        }
      }
    }
  ]
}

RULES:
- Only use tools from AVAILABLE TOOLS
- Include all required arguments
- Use one [TOOL_REQUEST] block per tool
- Never use [TOOL_RESULT]
- If you decide to call one or more tools, there should be no other text in your message

Examples:
"Check Paris weather"
[TOOL_REQUEST]{"name": "get_weather", "arguments": {"location": "Paris"}}[END_TOOL_REQUEST]

"Send email to John about meeting and open browser"
[TOOL_REQUEST]{"name": "send_email", "arguments": {"to": "John", "subject": "meeting"}}[END_TOOL_REQUEST]
[TOOL_REQUEST]{"name": "open_browser", "arguments": {}}[END_TOOL_REQUEST]

Respond conversationally if no matching tools exist."""  # noqa: E501


def test_default_system_prompt_is_the_documented_text() -> None:
    assert default_system_prompt([DELIVERY_TOOL]) == DOCS_SYSTEM_PROMPT


def test_default_system_prompt_keeps_non_ascii() -> None:
    tool = copy.deepcopy(DELIVERY_TOOL)
    tool["function"]["description"] = "Lieferdatum für eine Bestellung"
    assert "Lieferdatum für eine Bestellung" in default_system_prompt([tool])


def test_default_prompt_is_the_system_turn_in_chatml() -> None:
    user = {"role": "user", "content": "Get me delivery date for order 123"}
    messages, tools = prepare_chat([user], [DELIVERY_TOOL], "default")
    assert tools is None
    prompt = render_chat(CHATML, messages)
    assert prompt == (f"<|im_start|>system\n{DOCS_SYSTEM_PROMPT}<|im_end|>\n"
                      "<|im_start|>user\nGet me delivery date for order 123<|im_end|>\n"
                      "<|im_start|>assistant\n")


# -- prepare_chat ----------------------------------------------------------------------------


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "When will orders 123 and 456 arrive?"},
    {"role": "assistant", "content": "",
     "tool_calls": [_call("call_1", "get_delivery_date", '{"order_id": "123"}'),
                    _call("call_2", "get_delivery_date", '{"order_id":"456"}')]},
    {"role": "tool", "content": "2024-03-15", "tool_call_id": "call_1"},
    {"role": "tool", "content": "2024-03-16", "tool_call_id": "call_2"},
]


def test_default_format_converts_the_tool_turns() -> None:
    messages, tools = prepare_chat(HISTORY, [DELIVERY_TOOL], "default")
    assert tools is None
    assert messages == [
        {"role": "system", "content": DOCS_SYSTEM_PROMPT},
        {"role": "user", "content": "When will orders 123 and 456 arrive?"},
        {"role": "assistant", "content":
            '[TOOL_REQUEST]{"name": "get_delivery_date", "arguments": {"order_id": "123"}}'
            "[END_TOOL_REQUEST]\n"
            '[TOOL_REQUEST]{"name": "get_delivery_date", "arguments": {"order_id": "456"}}'
            "[END_TOOL_REQUEST]"},
        # Two tool results in a row: one user turn, so the roles still alternate.
        {"role": "user", "content": "[TOOL_RESULT]2024-03-15[END_TOOL_RESULT]\n\n"
                                    "[TOOL_RESULT]2024-03-16[END_TOOL_RESULT]"},
    ]


def test_default_format_keeps_assistant_text_before_the_requests() -> None:
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "Let me check.",
                "tool_calls": [_call("c", "open_browser", "")]}]
    messages, _ = prepare_chat(history, None, "default")
    assert messages[-1] == {
        "role": "assistant",
        "content": 'Let me check.\n[TOOL_REQUEST]{"name": "open_browser", "arguments": {}}'
                   "[END_TOOL_REQUEST]",
    }


def test_default_format_merges_a_tool_result_into_the_next_user_turn() -> None:
    history = [*HISTORY[:3], {"role": "user", "content": "And the other one?"}]
    messages, _ = prepare_chat(history, [DELIVERY_TOOL], "default")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == ("[TOOL_RESULT]2024-03-15[END_TOOL_RESULT]\n\n"
                                       "And the other one?")


def test_default_format_puts_the_callers_system_text_after_the_tool_prompt() -> None:
    history = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Order 123?"}]
    messages, _ = prepare_chat(history, [DELIVERY_TOOL], "default")
    assert messages == [
        {"role": "system", "content": DOCS_SYSTEM_PROMPT + "\n\nYou are terse."},
        {"role": "user", "content": "Order 123?"},
    ]
    prompt = render_chat(CHATML, messages)
    assert prompt.count("<|im_start|>system\n") == 1
    assert "Respond conversationally if no matching tools exist.\n\nYou are terse.<|im_end|>" \
        in prompt


def test_default_format_without_tools_converts_but_adds_no_prompt() -> None:
    messages, tools = prepare_chat(HISTORY, None, "default")
    assert tools is None
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert all("tool_calls" not in m and "tool_call_id" not in m for m in messages)
    assert "You are a tool-calling AI" not in render_chat(CHATML, messages)


def test_prepare_chat_leaves_its_input_alone() -> None:
    before = copy.deepcopy(HISTORY)
    for fmt in FORMATS:
        prepare_chat(HISTORY, [DELIVERY_TOOL], fmt)
    assert before == HISTORY


def test_native_formats_pass_messages_through_with_parsed_arguments() -> None:
    tools = [DELIVERY_TOOL]
    messages, template_tools = prepare_chat(HISTORY, tools, "hermes")
    assert template_tools is tools
    assert messages[0] == HISTORY[0] and messages[2:] == HISTORY[2:]
    calls = messages[1]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"order_id": "123"},
                                                         {"order_id": "456"}]
    assert [c["id"] for c in calls] == ["call_1", "call_2"]
    assert prepare_chat(HISTORY, None, "llama3")[1] is None


def test_native_history_renders_through_the_qwen_template() -> None:
    messages, tools = prepare_chat(HISTORY, [DELIVERY_TOOL], "hermes")
    prompt = render_chat(QWEN25_TEMPLATE, messages, tools=tools)
    assert ('<tool_call>\n{"name": "get_delivery_date", "arguments": {"order_id": "123"}}\n'
            "</tool_call>") in prompt
    assert '"name": "get_delivery_date", "description"' in prompt  # the tool list
    assert "<tool_response>\n2024-03-16\n</tool_response>" in prompt


# -- call grammars, checked by llama.cpp itself ----------------------------------------------


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one token per byte, so any text can be tokenized."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


class GrammarChecker:
    """llama.cpp's own grammar parser and sampler over a synthetic byte-level vocabulary.

    ``LlamaGrammar.from_string`` only stores the text in llama-cpp-python 0.3.x, so the real
    check is llama_sampler_init_grammar (NULL on a parse error) plus sampling token by token.
    """

    def __init__(self, path: Path) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, "could not load the synthetic vocabulary"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)

    def parses(self, gbnf: str) -> bool:
        llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Whether sampling under ``gbnf`` can produce exactly ``text`` and then stop."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert sampler, "llama.cpp rejected the grammar"
        try:
            for token in [*self._tokenize(text), self.eos]:
                if not self._allowed(sampler, token):
                    return False
                if token != self.eos:
                    llama_cpp.llama_sampler_accept(sampler, token)
            return True
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def _tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)


@pytest.fixture(scope="module")
def grammar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrammarChecker]:
    path = make_gguf(tmp_path_factory.mktemp("vocab") / "bytes.gguf",
                     tokens=[*_byte_tokens(), "<s>", "</s>", "ĠĠ"], merges=["Ġ Ġ"],
                     bos_token_id=256, eos_token_id=257)
    checker = GrammarChecker(path)
    yield checker
    checker.close()


def test_the_checker_itself_rejects_bad_grammars_and_texts(grammar: GrammarChecker) -> None:
    assert not grammar.parses("root ::= undefined-rule")
    assert grammar.parses('root ::= "a" [0-9]+')
    assert grammar.accepts('root ::= "a" [0-9]+', "a42")
    assert not grammar.accepts('root ::= "a" [0-9]+', "a")
    assert not grammar.accepts('root ::= "a" [0-9]+', "b4")


SEARCH_TOOL: dict[str, Any] = SEARCH_PRODUCTS
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_current_time", "description": "Get the current time"}}
EMPTY_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "open_browser", "parameters": {"type": "object", "properties": {}, "required": []}}}
NESTED_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "create_order",
    "parameters": {
        "type": "object",
        "properties": {
            "customer": {"type": "object",
                         "properties": {"name": {"type": "string"},
                                        "tier": {"enum": ["root", "gold"]}},
                         "required": ["name"]},
            "items": {"type": "array",
                      "items": {"type": "object",
                                "properties": {"sku": {"type": "string"},
                                               "qty": {"type": "integer"}},
                                "required": ["sku", "qty"]}},
            "root": {"type": "boolean"},
        },
        "required": ["customer", "items"],
    },
}}
ALL_TOOLS = [SEARCH_TOOL, TIME_TOOL, EMPTY_TOOL, NESTED_TOOL, DELIVERY_TOOL]


def _wrapped(fmt: ToolFormat, call: dict[str, Any]) -> str:
    """The text of one call as the grammar for ``fmt`` should produce it."""
    if fmt == "llama3":
        return json.dumps({("parameters" if k == "arguments" else k): v for k, v in call.items()})
    body = json.dumps(call)
    return {"default": f"[TOOL_REQUEST]{body}[END_TOOL_REQUEST]",
            "hermes": f"<tool_call>\n{body}\n</tool_call>",
            "mistral": f"[TOOL_CALLS][{body}]"}[fmt]


GOOD_CALLS: list[dict[str, Any]] = [
    {"name": "search_products", "arguments": {"query": "dell"}},
    {"name": "search_products",
     "arguments": {"query": "dell", "category": "electronics", "max_price": 50}},
    {"name": "get_current_time", "arguments": {}},
    {"name": "get_current_time", "arguments": {"tz": "UTC", "verbose": True}},
    {"name": "open_browser", "arguments": {}},
    {"name": "create_order", "arguments": {
        "customer": {"name": "Ann", "tier": "root"},
        "items": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}], "root": False}},
    {"name": "get_delivery_date", "arguments": {"order_id": "123"}},
]
BAD_CALLS: list[dict[str, Any]] = [
    {"name": "search_everything", "arguments": {"query": "dell"}},  # no such tool
    {"name": "search_products", "arguments": {}},  # required field missing
    {"name": "search_products", "arguments": {"query": "dell", "category": "food"}},  # enum
    {"name": "search_products", "arguments": {"query": "dell", "color": "red"}},  # additional
    {"name": "search_products", "arguments": {"query": 5}},  # wrong type
    {"name": "open_browser", "arguments": {"url": "x"}},  # no properties at all
    {"name": "create_order", "arguments": {"customer": {"name": "Ann"},
                                           "items": [{"sku": "A1"}]}},  # nested required
    {"name": "create_order", "arguments": {"customer": {"name": "Ann", "tier": "leaf"},
                                           "items": []}},  # nested enum
    {"name": "open_browser", "arguments": {}, "extra": 1},  # more than name and arguments
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_call_grammar_accepts_exactly_the_well_formed_calls(fmt: ToolFormat,
                                                            grammar: GrammarChecker) -> None:
    gbnf = call_grammar(ALL_TOOLS, fmt)
    assert grammar.parses(gbnf)
    assert gbnf.count("root ::=") == 1
    for call in GOOD_CALLS:
        assert grammar.accepts(gbnf, _wrapped(fmt, call)), call
    for call in BAD_CALLS:
        assert not grammar.accepts(gbnf, _wrapped(fmt, call)), call


@pytest.mark.parametrize("fmt", FORMATS)
def test_call_grammar_needs_the_markers(fmt: ToolFormat, grammar: GrammarChecker) -> None:
    gbnf = call_grammar([DELIVERY_TOOL], fmt)
    call = {"name": "get_delivery_date", "arguments": {"order_id": "123"}}
    assert grammar.accepts(gbnf, _wrapped(fmt, call))
    bare = json.dumps(call)
    assert grammar.accepts(gbnf, bare) is False  # wrong key for llama3, no markers otherwise
    assert not grammar.accepts(gbnf, _wrapped(fmt, call) + " and more")


@pytest.mark.parametrize("fmt", FORMATS)
def test_call_grammar_for_a_named_function(fmt: ToolFormat, grammar: GrammarChecker) -> None:
    gbnf = call_grammar(ALL_TOOLS, fmt, "get_delivery_date")
    assert grammar.parses(gbnf)
    assert grammar.accepts(gbnf, _wrapped(fmt, GOOD_CALLS[-1]))
    assert not grammar.accepts(gbnf, _wrapped(fmt, GOOD_CALLS[0]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_call_grammar_for_a_tool_without_parameters(fmt: ToolFormat,
                                                    grammar: GrammarChecker) -> None:
    gbnf = call_grammar([TIME_TOOL], fmt)
    assert grammar.accepts(gbnf, _wrapped(fmt, {"name": "get_current_time", "arguments": {}}))
    assert not grammar.accepts(gbnf, _wrapped(fmt, {"name": "get_current_time",
                                                    "arguments": []}))


def test_call_grammar_rejects_an_unknown_name_and_no_tools() -> None:
    with pytest.raises(ValueError, match="nope"):
        call_grammar(ALL_TOOLS, "hermes", "nope")
    with pytest.raises(ValueError):
        call_grammar([], "default")


def test_wrapping_renames_only_the_root_rule(grammar: GrammarChecker) -> None:
    body = ('root ::= "\\"root\\"" tool-call [root]\n'
            'tool-call ::= "-" root-ish\n'
            "root-ish ::= \"x\"\n")
    gbnf = _wrap_grammar(body, "<", ">")
    assert gbnf.splitlines()[0] == 'root ::= "<" tool-call-1 ">"'
    assert 'tool-call-1 ::= "\\"root\\"" tool-call [root]' in gbnf
    assert grammar.accepts(gbnf, '<"root"-xr>')


# -- the parser ------------------------------------------------------------------------------


def run_parser(fmt: ToolFormat, pieces: list[str], id_prefix: str = "call_"
               ) -> tuple[list[ParseEvent], ToolCallParser]:
    parser = ToolCallParser(fmt, id_prefix)
    events: list[ParseEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish(), parser


def normalized(events: list[ParseEvent]) -> list[ParseEvent]:
    """Adjacent content merged and random ids replaced, so that splits can be compared."""
    out: list[ParseEvent] = []
    for event in events:
        if isinstance(event, ContentDelta) and out and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + event.text)
        elif isinstance(event, CallStart | CallEnd):
            out.append(dataclasses.replace(event, id=f"id{event.index}"))
        else:
            out.append(event)
    return out


def parse(fmt: ToolFormat, text: str) -> list[ParseEvent]:
    return normalized(run_parser(fmt, [text])[0])


def content(events: list[ParseEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ContentDelta))


def calls(events: list[ParseEvent]) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, e.arguments) for e in events if isinstance(e, CallEnd)]


def split_every(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def split_randomly(text: str, seed: int) -> list[str]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        step = rng.randint(1, 6)
        pieces.append(text[i:i + step])
        i += step
    return pieces


# Recorded-style replies: (format, reply, expected content, expected calls).
DELIVERY = ("get_delivery_date", {"order_id": "123"})
RECORDED: list[tuple[ToolFormat, str, str, list[tuple[str, dict[str, Any]]]]] = [
    ("default", '[TOOL_REQUEST]{"name": "get_delivery_date", "arguments": {"order_id": "123"}}'
                "[END_TOOL_REQUEST]", "", [DELIVERY]),
    ("default", 'Let me look.\n[TOOL_REQUEST]{"name": "get_weather", "arguments": '
                '{"location": "Paris"}}[END_TOOL_REQUEST]\n[TOOL_REQUEST]{"name": '
                '"open_browser", "arguments": {}}[END_TOOL_REQUEST]\nDone, [TOOLS] ready.',
     "Let me look.\n\nDone, [TOOLS] ready.",
     [("get_weather", {"location": "Paris"}), ("open_browser", {})]),
    ("hermes", '<tool_call>\n{"name": "get_delivery_date", "arguments": {"order_id": "123"}}\n'
               "</tool_call>", "", [DELIVERY]),
    ("hermes", 'I will check both.\n<tool_call>\n{"name": "get_delivery_date", "arguments": '
               '{"order_id": "123"}}\n</tool_call>\n<tool_call>\n{"name": "get_delivery_date", '
               '"arguments": {"order_id": "456"}}\n</tool_call>',
     "I will check both.\n", [DELIVERY, ("get_delivery_date", {"order_id": "456"})]),
    ("hermes", '<tool_call>{"name":"say_hello","arguments":{"name":"Bob the Builder"}}</tool_call>'
               "\n\nI asked the tool to greet Bob.",
     "\n\nI asked the tool to greet Bob.", [("say_hello", {"name": "Bob the Builder"})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": '
                '"Paris, France", "format": "celsius"}}, {"name": "get_delivery_date", '
                '"arguments": {"order_id": "123"}}]',
     "", [("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
          DELIVERY]),
    ("mistral", 'Sure.[TOOL_CALLS][{"name": "get_delivery_date", "arguments": {"order_id": '
                '"123"}}] Anything else?', "Sure. Anything else?", [DELIVERY]),
    ("mistral", '[TOOL_CALLS]get_delivery_date[ARGS]{"order_id": "123"}[TOOL_CALLS]'
                'open_browser[CALL_ID]a1b2c3d4e[ARGS]{}', "",
     [DELIVERY, ("open_browser", {})]),
    ("llama3", '{"name": "get_delivery_date", "parameters": {"order_id": "123"}}', "",
     [DELIVERY]),
    ("llama3", '<|python_tag|>{"name": "get_delivery_date", "parameters": {"order_id": "123"}}',
     "", [DELIVERY]),
    ("llama3", '\n{"name": "f", "arguments": {"a": [1, 2]}}; {"name": "g", "parameters": {}}',
     "", [("f", {"a": [1, 2]}), ("g", {})]),
    ("llama3", "Your order #123 will be delivered on March 15th, 2024",
     "Your order #123 will be delivered on March 15th, 2024", []),
]


@pytest.mark.parametrize(("fmt", "reply", "text", "expected"), RECORDED)
def test_recorded_replies(fmt: ToolFormat, reply: str, text: str,
                          expected: list[tuple[str, dict[str, Any]]]) -> None:
    events, parser = run_parser(fmt, [reply])
    assert content(events) == text
    assert calls(events) == expected
    assert parser.calls == [e for e in events if isinstance(e, CallEnd)]
    _check_call_events(events)


def _check_call_events(events: list[ParseEvent]) -> None:
    """Each call: CallStart, its arguments in fragments, CallEnd with the same id and name."""
    for end in (e for e in events if isinstance(e, CallEnd)):
        start = next(e for e in events if isinstance(e, CallStart) and e.index == end.index)
        assert (start.id, start.name) == (end.id, end.name)
        fragments = [e.text for e in events if isinstance(e, CallArgs) and e.index == end.index]
        assert json.loads("".join(fragments)) == end.arguments
        assert all(0 < len(f) <= 16 for f in fragments)
        assert events.index(start) < events.index(end)
    ends = [e for e in events if isinstance(e, CallEnd)]
    assert [e.index for e in ends] == list(range(len(ends)))


@pytest.mark.parametrize(("fmt", "reply", "text", "expected"), RECORDED)
@pytest.mark.parametrize("split", ["chars", "2", "3", "5", "seed0", "seed1", "seed2", "seed3"])
def test_any_split_gives_the_same_events(fmt: ToolFormat, reply: str, text: str,
                                         expected: list[Any], split: str) -> None:
    if split == "chars":
        pieces = list(reply)
    elif split.startswith("seed"):
        pieces = split_randomly(reply, int(split[4:]))
    else:
        pieces = split_every(reply, int(split))
    whole = normalized(run_parser(fmt, [reply])[0])
    assert normalized(run_parser(fmt, pieces)[0]) == whole


def test_call_arguments_come_in_several_fragments() -> None:
    reply = ('<tool_call>\n{"name": "search_products", "arguments": {"query": "dell laptop", '
             '"category": "electronics", "max_price": 50}}\n</tool_call>')
    events, _ = run_parser("hermes", [reply])
    assert [type(e) for e in events] == [CallStart, CallArgs, CallArgs, CallArgs, CallArgs,
                                         CallArgs, CallEnd]
    assert events[-1].raw == reply  # type: ignore[union-attr]


def test_ids_are_unique_and_use_the_prefix() -> None:
    reply = "".join('<tool_call>{"name": "t", "arguments": {}}</tool_call>' for _ in range(20))
    events, parser = run_parser("hermes", [reply], id_prefix="call_")
    ids = [c.id for c in parser.calls]
    assert len(set(ids)) == 20
    assert all(re.fullmatch(r"call_\d{9}", i) for i in ids)
    _, other = run_parser("hermes", [reply[:53]], id_prefix="x-")
    assert other.calls[0].id.startswith("x-")


def test_content_streams_as_soon_as_it_cannot_be_a_marker() -> None:
    parser = ToolCallParser("default")
    assert parser.feed("Let me check. ") == [ContentDelta("Let me check. ")]
    assert parser.feed("[TOOL") == []  # could still become [TOOL_REQUEST]
    assert parser.feed("S are") == [ContentDelta("[TOOLS are")]
    assert parser.feed(" here [TOOL_RE") == [ContentDelta(" here ")]
    assert parser.feed('QUEST]{"name": "a"') == []
    assert parser.feed("}[END_TOOL_") == []
    events = parser.feed("REQUEST]ok")
    assert calls(events) == [("a", {})] and events[-1] == ContentDelta("ok")
    assert parser.finish() == []


def test_markers_split_mid_marker_in_every_format() -> None:
    cases: list[tuple[ToolFormat, list[str]]] = [
        ("hermes", ["<", "tool", "_ca", "ll>\n{\"name\": \"a\", \"arguments\": {}}\n</tool", "_",
                    "call", ">"]),
        ("default", ["[TOOL_", "REQUEST", "]{\"name\": \"a\"}[END", "_TOOL_REQ", "UEST]"]),
        ("mistral", ["[TOOL", "_CALLS]", "[{\"name\": \"a\", \"argu", "ments\": {}}", "]"]),
        ("llama3", ["<|py", "thon_", "tag|>", "{\"name\": \"a\", \"parameters\": {}}"]),
    ]
    for fmt, pieces in cases:
        events, _ = run_parser(fmt, pieces)
        assert calls(events) == [("a", {})], fmt
        assert content(events) == "", fmt


def test_false_starts_are_content() -> None:
    for fmt, text in [("default", "Use [TOOL] or [TOOL_REQ] sparingly"),
                      ("hermes", "a <tool> and <tool_calls> tag"),
                      ("mistral", "[TOOL_CALL] is not [TOOL_CALLS"),
                      ("llama3", "say <|python_ta")]:
        for pieces in ([text], list(text)):
            events, _ = run_parser(fmt, pieces)
            assert content(events) == text and calls(events) == [], (fmt, pieces)


MALFORMED: list[tuple[ToolFormat, str]] = [
    ("default", '[TOOL_REQUEST]{"name": "a", "arguments": {"x": 1}[END_TOOL_REQUEST]'),
    ("default", '[TOOL_REQUEST]{"arguments": {"x": 1}}[END_TOOL_REQUEST]'),
    ("default", '[TOOL_REQUEST]{"name": "a", "arguments": "{\\"x\\": 1}"}[END_TOOL_REQUEST]'),
    ("default", '[TOOL_REQUEST]{"name": "a", "arguments": {}}'),
    ("hermes", '<tool_call>\n["name": "get_delivery_date", function: "date"]\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": 42, "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": [1, 2]}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}'),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"arguments": {}}]'),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}'),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": "x"}]'),
    ("mistral", "[TOOL_CALLS][]"),
    ("mistral", "[TOOL_CALLS]"),
    ("mistral", '[TOOL_CALLS]a[ARGS]{"x": '),
    ("mistral", "[TOOL_CALLS]a[ARGS][1]"),
    ("mistral", "[TOOL_CALLS]I think I need a tool."),
    ("llama3", '{"name": "a", "parameters": {"x": "1'),  # ends inside a string
    ("llama3", '{"name": "a", "parameters": 5}'),
    ("llama3", '<|python_tag|>brave_search.call(query="weather")'),
    ("llama3", '{"name": "a", "parameters": {}} and then some text'),
]


@pytest.mark.parametrize(("fmt", "reply"), MALFORMED)
def test_unparsable_calls_come_back_as_their_raw_text(fmt: ToolFormat, reply: str) -> None:
    # Llama 3 calls are whole replies, so only the other formats get text in front.
    text = reply if fmt == "llama3" else f"Hi. {reply}"
    for pieces in ([text], list(text), split_randomly(text, 7)):
        events, parser = run_parser(fmt, pieces)
        assert content(events) == text
        assert calls(events) == [] and parser.calls == []


def test_text_after_a_broken_call_still_finds_the_next_call() -> None:
    reply = ('<tool_call>{bad}</tool_call> then <tool_call>{"name": "a", "arguments": {}}'
             "</tool_call>")
    events = parse("hermes", reply)
    assert content(events) == "<tool_call>{bad}</tool_call> then "
    assert calls(events) == [("a", {})]
    assert [e.index for e in events if isinstance(e, CallEnd)] == [0]


def test_hermes_calls_with_newlines_and_indentation_around_the_json() -> None:
    reply = ('<tool_call>\n\n  {\n    "name": "get_delivery_date",\n    "arguments": {\n'
             '      "order_id": "123"\n    }\n  }\n\n</tool_call>\n')
    events = parse("hermes", reply)
    assert calls(events) == [DELIVERY] and content(events) == ""


def test_mistral_array_closes_the_call_even_with_brackets_in_strings() -> None:
    reply = ('[TOOL_CALLS][{"name": "note", "arguments": {"text": "a ] b } [ \\" ]"}}, '
             '{"name": "note", "arguments": {"text": "}"}}]\nok')
    parser = ToolCallParser("mistral")
    events = parser.feed(reply)  # decided without finish(): the array closed
    assert calls(events) == [("note", {"text": 'a ] b } [ " ]'}), ("note", {"text": "}"})]
    assert events[-1] == ContentDelta("\nok")


def test_llama3_json_reply_is_decided_by_its_first_character() -> None:
    parser = ToolCallParser("llama3")
    assert parser.feed("  ") == []
    assert parser.feed('{"name": "get_delivery_date", ') == []
    assert parser.feed('"parameters": {"order_id": "123"}}') == []  # parsed at finish()
    assert calls(parser.finish()) == [DELIVERY]

    parser = ToolCallParser("llama3")
    assert parser.feed("Hello") == [ContentDelta("Hello")]  # plain text streams at once
    assert parser.feed(" there") == [ContentDelta(" there")]


def test_llama3_json_that_is_not_a_call_is_content() -> None:
    for reply in ['{"answer": 42}', '{"name": "Bob", "age": 3}', "{not json at all",
                  '[{"name": "a", "parameters": {}}]']:
        events = parse("llama3", reply)
        assert events == [ContentDelta(reply)], reply


def test_whitespace_only_between_calls_is_dropped_but_kept_in_plain_replies() -> None:
    two = '<tool_call>{"name": "a"}</tool_call>\n\n<tool_call>{"name": "b"}</tool_call>\n'
    assert content(parse("hermes", "\n" + two)) == ""
    assert parse("hermes", "\n\n") == [ContentDelta("\n\n")]
    assert content(parse("default", "  hi  ")) == "  hi  "


def test_finish_flushes_a_held_back_marker_prefix() -> None:
    parser = ToolCallParser("hermes")
    assert parser.feed("the end <tool_ca") == [ContentDelta("the end ")]
    assert parser.finish() == [ContentDelta("<tool_ca")]


def test_events_are_the_documented_dataclasses() -> None:
    events = parse("default", '[TOOL_REQUEST]{"name": "n", "arguments": {"k": "v"}}'
                              "[END_TOOL_REQUEST]")
    assert events == [CallStart(0, "id0", "n"), CallArgs(0, '{"k": "v"}'),
                      CallEnd(0, "id0", "n", {"k": "v"},
                              '[TOOL_REQUEST]{"name": "n", "arguments": {"k": "v"}}'
                              "[END_TOOL_REQUEST]")]


def test_prompt_round_trip_default_format() -> None:
    """What the parser reads back is what prepare_chat writes for the history."""
    events, parser = run_parser("default", ['[TOOL_REQUEST]{"name": "get_delivery_date", '
                                            '"arguments": {"order_id": "123"}}'
                                            "[END_TOOL_REQUEST]"])
    call = parser.calls[0]
    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "",
                "tool_calls": [_call(call.id, call.name, json.dumps(call.arguments))]}]
    messages, _ = prepare_chat(history, None, "default")
    assert messages[-1]["content"] == call.raw


def test_raw_newlines_inside_strings_still_parse() -> None:
    parser = ToolCallParser("default")
    text = '[TOOL_REQUEST]{"name": "f", "arguments": {"code": "a\nb"}}[END_TOOL_REQUEST]'
    events = parser.feed(text) + parser.finish()
    ends = [e for e in events if isinstance(e, CallEnd)]
    assert [e.arguments for e in ends] == [{"code": "a\nb"}]


def test_a_closer_inside_a_json_string_does_not_end_the_call() -> None:
    parser = ToolCallParser("default")
    text = ('[TOOL_REQUEST]{"name": "f", "arguments": {"s": "a [END_TOOL_REQUEST] b"}}'
            "[END_TOOL_REQUEST]")
    parser.feed(text[:40])
    parser.feed(text[40:])
    parser.finish()
    assert [c.arguments for c in parser.calls] == [{"s": "a [END_TOOL_REQUEST] b"}]


# -- calls written loosely (bare JSON, a ```json fence, a list), recovered when tools were offered

OFFERED = ("get_delivery_date", "multiply", "analyze_directory")
# Qwen2.5-Coder 0.5B's own reply to the docs' delivery example
QWEN_FENCE = ('```json\n{\n  "name": "get_delivery_date",\n  "arguments": {\n    "order_id": '
              '"123"\n  }\n}\n```')
LOOSE: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    (QWEN_FENCE, "", [DELIVERY]),
    ('{"name": "get_delivery_date", "arguments": {"order_id": "123"}}', "", [DELIVERY]),
    ('\n```\n{"name": "multiply", "parameters": {"a": 2, "b": 3}}\n```\n', "",
     [("multiply", {"a": 2, "b": 3})]),
    ("I'll look that up for you.\n\n" + QWEN_FENCE, "I'll look that up for you.\n\n",
     [DELIVERY]),
    ('Sure: {"name": "analyze_directory", "arguments": {}}', "Sure: ",
     [("analyze_directory", {})]),
    ('```json\n[{"name": "multiply", "arguments": {"a": 1, "b": 2}}, {"name": '
     '"get_delivery_date", "arguments": {"order_id": "123"}}]\n```', "",
     [("multiply", {"a": 1, "b": 2}), DELIVERY]),
    (QWEN_FENCE + "\n\n" + QWEN_FENCE.replace("123", "456"), "",
     [DELIVERY, ("get_delivery_date", {"order_id": "456"})]),
    ('```json\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}', "",  # no closing fence
     [("multiply", {"a": 2, "b": 3})]),
    # the reply ended one brace short, as Qwen2.5-Coder 0.5B's greedy replies sometimes do
    ('{"name": "analyze_directory", "arguments": {"path": "./"}', "",
     [("analyze_directory", {"path": "./"})]),
    ('```json\n{"name": "multiply", "arguments": {"a": 2, "b": 3}\n```', "",
     [("multiply", {"a": 2, "b": 3})]),
]
NOT_CALLS = [
    '{"name": "delete_everything", "arguments": {}}',  # no offered tool of that name
    '```json\n{"name": "Bob", "arguments": {"age": 3}}\n```',
    '{"answer": 42}',
    '{"name": "multiply", "arguments": "{\\"a\\": 1}"}',  # arguments must be an object
    '{"name": "multiply"}',
    '[{"name": "multiply", "arguments": {}}, {"name": "nope", "arguments": {}}]',
    '```json\n{"name": "multiply", "arguments": {"a": 1}}\n```\nThat call gives the product.',
    '{"name": "multiply", "arguments": {"a": 1}} is how you would call it',
    "```python\nprint({\"name\": 1})\n```",
    "```json\nnot json\n```",
    '{"name": "multiply", "arguments": {"a": "1',  # ends inside a string
    '{"name": "multiply", "arguments": {"a": 1}, "x": ',  # ends before a value
    "function f() { return 1; } and [1, 2] and {}",
]


def run_offered(fmt: ToolFormat, pieces: list[str]) -> tuple[list[ParseEvent], ToolCallParser]:
    parser = ToolCallParser(fmt, offered=OFFERED)
    events: list[ParseEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish(), parser


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("reply", "text", "expected"), LOOSE)
def test_loose_calls_naming_offered_tools_are_recovered(fmt: ToolFormat, reply: str, text: str,
                                                         expected: list[Any]) -> None:
    for pieces in ([reply], list(reply), split_randomly(reply, 3), split_every(reply, 4)):
        events, parser = run_offered(fmt, pieces)
        assert content(events) == text, pieces
        assert calls(events) == expected
        native = fmt == "llama3" and reply.startswith("{")  # Llama 3's own bare JSON call
        assert all(c.recovered != native for c in parser.calls)
        _check_call_events(events)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("reply", NOT_CALLS)
def test_json_that_is_not_an_offered_call_stays_text(fmt: ToolFormat, reply: str) -> None:
    if fmt == "llama3" and reply.startswith("{"):
        return  # Llama 3's own format: a reply that starts with `{` is read as its call
    for pieces in ([reply], list(reply), split_randomly(reply, 5)):
        events, _ = run_offered(fmt, pieces)
        assert content(events) == reply and calls(events) == [], pieces


def test_without_offered_names_loose_json_stays_text() -> None:
    events, parser = run_parser("hermes", [QWEN_FENCE])
    assert content(events) == QWEN_FENCE and parser.calls == []


def test_native_calls_are_not_marked_recovered() -> None:
    reply = '<tool_call>\n{"name": "multiply", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    _, parser = run_offered("hermes", [reply])
    assert [(c.name, c.recovered) for c in parser.calls] == [("multiply", False)]


def test_a_native_call_and_a_loose_one_in_one_reply() -> None:
    reply = ('<tool_call>\n{"name": "multiply", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
             + QWEN_FENCE)
    events, parser = run_offered("hermes", [reply])
    assert calls(events) == [("multiply", {"a": 1, "b": 2}), DELIVERY]
    assert [c.recovered for c in parser.calls] == [False, True] and content(events) == ""


def test_a_possible_loose_call_is_held_back_until_decided() -> None:
    parser = ToolCallParser("hermes", offered=OFFERED)
    assert parser.feed("Checking.\n``") == [ContentDelta("Checking.\n")]
    assert parser.feed('`json\n{\n  "name": "get_delivery_date",') == []
    assert parser.feed(' "arguments": {"order_id": "123"}}\n```') == []
    events = parser.finish()  # only the end of the reply makes it the reply's tail
    assert calls(events) == [DELIVERY] and content(events) == ""


def test_other_json_is_released_as_soon_as_its_first_key_rules_a_call_out() -> None:
    parser = ToolCallParser("hermes", offered=OFFERED)
    assert parser.feed('```json\n{"answer') == []
    assert content(parser.feed('": ')) == '```json\n{"answer": '
    parser = ToolCallParser("default", offered=OFFERED)
    assert parser.feed('{"name": "Bob') == []
    assert content(parser.feed('", "age": 3')) == '{"name": "Bob", "age": 3'
    parser = ToolCallParser("default", offered=OFFERED)
    assert content(parser.feed("```python\nx = {")) == "```python\nx = "


def test_a_recovered_call_then_more_text_becomes_text_again() -> None:
    parser = ToolCallParser("hermes", offered=OFFERED)
    held = parser.feed(QWEN_FENCE + "\n")
    assert held == []
    assert content(parser.feed("This fetches it.")) == QWEN_FENCE + "\nThis fetches it."
    assert parser.finish() == [] and parser.calls == []


def test_a_long_loose_call_fed_in_small_pieces_is_parsed_quickly() -> None:
    import time

    body = "line of a file with some words in it\n" * 1500  # about 55 kB of arguments
    reply = "```json\n" + json.dumps({"name": "multiply", "arguments": {"text": body}}) + "\n```"
    started = time.perf_counter()
    events, _ = run_offered("hermes", split_every(reply, 4))
    assert time.perf_counter() - started < 2.0
    assert calls(events) == [("multiply", {"text": body})]
