"""Tool use: which call format a model speaks, the prompt side, call grammars, and a parser.

Two levels of support, as in LM Studio:

- *native*: the chat template renders ``tools`` and we know the model's call format (Hermes /
  Qwen ``<tool_call>``, Llama 3.1 JSON, Mistral ``[TOOL_CALLS]``); messages go to the template
  almost unchanged.
- *default*: every other model gets LM Studio's default system prompt and its
  ``[TOOL_REQUEST]{json}[END_TOOL_REQUEST]`` format, and the tool turns of the history are
  rewritten as plain text so that any template can render them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from lmscli.prompting import loose
from lmscli.prompting.gbnf import literal as gbnf_literal
from lmscli.prompting.grammar import json_schema_grammar
from lmscli.prompting.loose import close_json, json_end

ToolFormat = Literal["default", "hermes", "llama3", "mistral"]

REQUEST_OPEN, REQUEST_CLOSE = "[TOOL_REQUEST]", "[END_TOOL_REQUEST]"
RESULT_OPEN, RESULT_CLOSE = "[TOOL_RESULT]", "[END_TOOL_RESULT]"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
PYTHON_TAG = "<|python_tag|>"

# -- format detection ------------------------------------------------------------------------

_TOOLS_VARIABLE = re.compile(r"\btools\b")


def detect_format(template: str | None) -> ToolFormat:
    """The model's native call format, or "default" when we can't use a native one."""
    # A template that never looks at `tools` can't show them to the model, whatever it mentions.
    if not template or not _TOOLS_VARIABLE.search(template):
        return "default"
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_OPEN in template:
        return "mistral"
    if PYTHON_TAG in template or "<|eom_id|>" in template:
        return "llama3"
    return "default"


# -- the default system prompt ---------------------------------------------------------------

_PROMPT_HEAD = (
    "You are a tool-calling AI. You can request calls to available tools with this EXACT format:\n"
    '[TOOL_REQUEST]{"name": "tool_name", "arguments": {"param1": "value1"}}[END_TOOL_REQUEST]\n'
    "\n"
    "AVAILABLE TOOLS:\n"
)
_PROMPT_TAIL = (
    "\n"
    "\n"
    "RULES:\n"
    "- Only use tools from AVAILABLE TOOLS\n"
    "- Include all required arguments\n"
    "- Use one [TOOL_REQUEST] block per tool\n"
    "- Never use [TOOL_RESULT]\n"
    "- If you decide to call one or more tools, there should be no other text in your message\n"
    "\n"
    "Examples:\n"
    '"Check Paris weather"\n'
    '[TOOL_REQUEST]{"name": "get_weather", "arguments": {"location": "Paris"}}'
    "[END_TOOL_REQUEST]\n"
    "\n"
    '"Send email to John about meeting and open browser"\n'
    '[TOOL_REQUEST]{"name": "send_email", "arguments": {"to": "John", "subject": "meeting"}}'
    "[END_TOOL_REQUEST]\n"
    '[TOOL_REQUEST]{"name": "open_browser", "arguments": {}}[END_TOOL_REQUEST]\n'
    "\n"
    "Respond conversationally if no matching tools exist."
)


def default_system_prompt(tools: list[dict[str, Any]]) -> str:
    """LM Studio's default tool prompt (lms.md §4.4), with the tools as pretty-printed JSON."""
    # JSON.stringify in LM Studio leaves non-ASCII alone, hence ensure_ascii=False.
    listing = json.dumps({"type": "toolArray", "tools": tools}, indent=2, ensure_ascii=False)
    return _PROMPT_HEAD + listing + _PROMPT_TAIL


# -- messages for the template ---------------------------------------------------------------


def prepare_chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 fmt: ToolFormat) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the chat template, tools for the template or None)."""
    if fmt != "default":
        return [_native_message(m) for m in messages], tools
    converted = [_default_message(m) for m in messages]
    if tools:
        # Merging below joins this with a leading caller system message, separated by a blank
        # line: one system turn, tool prompt first.
        converted.insert(0, {"role": "system", "content": default_system_prompt(tools)})
    return _merge_same_role(converted), None


def _native_message(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    if message.get("role") == "assistant" and message.get("tool_calls"):
        # Native templates index into the arguments (`arguments | items`), so they need dicts.
        out["tool_calls"] = [_with_parsed_arguments(c) for c in message["tool_calls"]]
    return out


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    function["arguments"] = _arguments_value(function.get("arguments"))
    return {**call, "function": function}


def _arguments_value(arguments: Any) -> Any:
    """Arguments as a dict when they are a JSON object string; anything else unchanged."""
    if not isinstance(arguments, str):
        return {} if arguments is None else arguments
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # the template gets what the client sent rather than a crash


def _default_message(message: dict[str, Any]) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content") or ""
    # Tool-only fields are dropped: the default format carries them as text instead.
    rest = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
    if role == "tool":
        return {**rest, "role": "user", "content": f"{RESULT_OPEN}{content}{RESULT_CLOSE}"}
    if role == "assistant" and message.get("tool_calls"):
        requests = "\n".join(_request_text(c) for c in message["tool_calls"])
        return {**rest, "content": f"{content}\n{requests}" if content else requests}
    return {**rest, "content": content}


def _request_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name", ""),
            "arguments": _arguments_value(function.get("arguments"))}
    return f"{REQUEST_OPEN}{json.dumps(body, ensure_ascii=False)}{REQUEST_CLOSE}"


def _merge_same_role(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive turns of one role become one, for templates that insist on alternation."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1].get("role") == message.get("role"):
            parts = [p for p in (merged[-1]["content"], message["content"]) if p]
            merged[-1] = {**merged[-1], "content": "\n\n".join(parts)}
        else:
            merged.append(message)
    return merged


def fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that allow a system message only first: each later one joins the next
    user turn (or, at the end, the last one), so that the turns before it, and the prompt's
    prefix with them, stay as they were."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    out = list(messages[:lead])
    held: list[str] = []
    for message in messages[lead:]:
        if message.get("role") == "system":
            held.append(message.get("content") or "")
        elif held and message.get("role") == "user":
            out.append({**message, "content": _joined(*held, message.get("content") or "")})
            held = []
        else:
            out.append(message)
    if held:
        users = [i for i, m in enumerate(out) if m.get("role") == "user"]
        at = users[-1] if users else (lead - 1 if lead else None)
        if at is None:
            return [{"role": "system", "content": _joined(*held)}, *out]
        out[at] = {**out[at], "content": _joined(out[at].get("content") or "", *held)}
    return out


def _joined(*texts: str) -> str:
    return "\n\n".join(t for t in texts if t)


# -- grammars that force one call -----------------------------------------------------------

_WRAPPERS: dict[str, tuple[str, str]] = {
    "default": (REQUEST_OPEN, REQUEST_CLOSE),
    "hermes": (HERMES_OPEN + "\n", "\n" + HERMES_CLOSE),
    "mistral": (MISTRAL_OPEN + "[", "]"),
    "llama3": ("", ""),
}
# A GBNF string literal, a character class, a comment, or a word (a rule name or a keyword).
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[A-Za-z0-9_-]+')
_GBNF_RULE = re.compile(r"^([A-Za-z0-9_-]+)\s*::=", re.MULTILINE)


def call_grammar(tools: list[dict[str, Any]], fmt: ToolFormat, name: str | None = None) -> str:
    """GBNF for exactly one well-formed call of one of ``tools`` (or of ``name``).

    Raises SchemaError naming the tool whose parameters can't become a grammar.
    """
    functions = []
    for i, tool in enumerate(tools):
        function = _function(tool)
        if name is None or function.get("name") == name:
            # each on its own first, so that an error names the tool it is in
            json_schema_grammar(_parameters(function), f"tools[{i}].function.parameters")
            functions.append(function)
    if name is not None and not functions:
        raise ValueError(f"No tool named {name!r}.")
    if not functions:
        raise ValueError("A call grammar needs at least one tool.")
    key = "parameters" if fmt == "llama3" else "arguments"
    schemas = [_call_schema(f, key) for f in functions]
    body = json_schema_grammar(schemas[0] if len(schemas) == 1 else {"oneOf": schemas},
                               lenient=True)
    return _wrap_grammar(body, *_WRAPPERS[fmt])


def input_call_grammar(name: str, fmt: ToolFormat, input_gbnf: str) -> str:
    """GBNF for one call of the freeform tool ``name``: its one argument, ``input``, is a
    string whose JSON-escaped text ``input_gbnf`` (a grammar with its own ``root``) writes."""
    key = "parameters" if fmt == "llama3" else "arguments"
    text = _free_rule_name("input-text", set(_GBNF_RULE.findall(input_gbnf)))
    inner = _GBNF_TOKEN.sub(lambda m: text if m.group(0) == "root" else m.group(0), input_gbnf)
    head = '{"name": ' + json.dumps(name) + ', "' + key + '": {"input": "'
    return _wrap_grammar(f"root ::= {gbnf_literal(head)} {text} {gbnf_literal(chr(34) + '}}')}"
                         f"\n{inner}", *_WRAPPERS[fmt])


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    # OpenAI shape {"type": "function", "function": {...}}; a bare function is accepted too.
    function = tool.get("function")
    return function if isinstance(function, dict) else tool


def _parameters(function: dict[str, Any]) -> Any:
    parameters = function.get("parameters")
    return {"type": "object"} if parameters is None or parameters == {} else parameters


def _call_schema(function: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.get("name")}, key: _parameters(function)},
        "required": ["name", key],
        "additionalProperties": False,
    }


def _wrap_grammar(body: str, prefix: str, suffix: str) -> str:
    """Our own root around the converter's: its `root` is renamed to a name it doesn't use."""
    call = _free_rule_name("tool-call", set(_GBNF_RULE.findall(body)))
    renamed = _GBNF_TOKEN.sub(lambda m: call if m.group(0) == "root" else m.group(0), body)
    parts = [gbnf_literal(prefix) if prefix else "", call, gbnf_literal(suffix) if suffix else ""]
    return f"root ::= {' '.join(p for p in parts if p)}\n{renamed}"


def _free_rule_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


# -- parsing calls out of generated text -----------------------------------------------------


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    text: str  # a fragment of the arguments JSON string


@dataclass
class CallEnd:
    index: int
    id: str
    name: str
    arguments: dict[str, Any]
    raw: str
    recovered: bool = False  # written loosely (bare JSON, a fence), not in the model's format


ParseEvent = ContentDelta | CallStart | CallArgs | CallEnd

_ARGS_FRAGMENT = 16  # characters per CallArgs, so streaming clients see the arguments grow
_OPENERS: dict[str, tuple[str, ...]] = {
    "default": (REQUEST_OPEN,),
    "hermes": (HERMES_OPEN,),
    "mistral": (MISTRAL_OPEN,),
    "llama3": (PYTHON_TAG,),
}
_CLOSERS = {REQUEST_OPEN: REQUEST_CLOSE, HERMES_OPEN: HERMES_CLOSE}
_LOOSE = "loose"  # the opener of a call written loosely (see loose.py)
# A loose call is scanned again only when the text grows past one of these (or is short):
# only they can end a JSON value or a fence, or decide the first key.
_LOOSE_TRIGGERS = frozenset('}]`":')
_LOOSE_SHORT = 256
_Call = tuple[str, dict[str, Any]]


class ToolCallParser:
    """Splits generated text, fed piece by piece, into content and tool calls.

    Whitespace that only separates calls (at the start of the reply, between calls, after the
    last one) is dropped, so that a reply made of calls has no content.

    With ``offered`` (the names of the tools offered), calls written loosely at the end of
    the reply are recovered too (see loose.py); text that could start one is held back until
    that is decided.
    """

    def __init__(self, fmt: ToolFormat, id_prefix: str = "call_",
                 offered: Iterable[str] = ()) -> None:
        self.fmt: ToolFormat = fmt
        self.offered = frozenset(offered)
        self._scanned = 0  # how much of a loose candidate the last scan saw
        self.calls: list[CallEnd] = []
        self._id_prefix = id_prefix
        self._buf = ""  # text not yet turned into events
        self._opener: str | None = None  # the marker of the call being read, "" for bare JSON
        self._blank = ""  # whitespace held back while it may only separate calls
        self._separating = True  # at the start or right after a call
        self._decided = fmt != "llama3"  # llama3: is the reply a bare JSON call or text?
        self._rng = random.Random()

    def feed(self, text: str) -> list[ParseEvent]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[ParseEvent]:
        out = self._drain(final=True)
        if self._blank and not self.calls:
            out.append(ContentDelta(self._blank))
        self._blank = ""
        return out

    def _drain(self, final: bool) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        while self._step(out, final):
            pass
        return out

    def _step(self, out: list[ParseEvent], final: bool) -> bool:
        """Consume what can be decided now; True when another step may make progress."""
        if not self._decided:
            return self._decide_llama3(out, final)
        if self._opener is None:
            return self._text_step(out, final)
        if self._opener == _LOOSE:
            return self._loose_step(out, final)
        if self._opener in _CLOSERS:
            return self._closed_call_step(out, final)
        if self._opener == MISTRAL_OPEN:
            return self._mistral_step(out, final)
        return self._to_end_step(out, final)

    # text outside calls

    def _text_step(self, out: list[ParseEvent], final: bool) -> bool:
        openers = _OPENERS[self.fmt]
        found = [(i, m) for m in openers if (i := self._buf.find(m)) >= 0]
        if self.offered and (i := loose.find_start(self._buf)) >= 0:
            found.append((i, _LOOSE))
        if found:
            start, marker = min(found, key=lambda f: f[0])
            self._content(out, self._buf[:start])
            skip = 0 if marker == _LOOSE else len(marker)
            self._buf, self._opener = self._buf[start + skip:], marker
            self._scanned = 0
            return True
        keep = 0 if final else _partial_marker_length(self._buf, openers)
        if self.offered and not final:
            keep = max(keep, loose.partial_start_length(self._buf))
        cut = len(self._buf) - keep
        self._content(out, self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _content(self, out: list[ParseEvent], text: str) -> None:
        text, self._blank = self._blank + text, ""
        if not text:
            return
        if text.isspace() and self._separating:
            self._blank = text  # dropped if a call follows, emitted if text does
            return
        self._separating = False
        out.append(ContentDelta(text))

    def _decide_llama3(self, out: list[ParseEvent], final: bool) -> bool:
        """Llama 3.1 answers with a bare JSON call: a reply whose first character is `{`."""
        head = self._buf.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and not final):
            if final:
                self._decided = True
                return True
            return False
        self._decided = True
        if head.startswith("{"):
            self._opener = ""  # the call runs to the end of the reply
        return True

    # calls

    def _closed_call_step(self, out: list[ParseEvent], final: bool) -> bool:
        opener = self._opener or ""
        start = len(self._buf) - len(self._buf.lstrip())
        after = 0
        if start < len(self._buf) and self._buf[start] == "{":
            # a closer inside the call's own JSON strings is not the end of the call
            value_end = json_end(self._buf, start)
            if value_end is None and not final:
                return False
            after = value_end or 0
        end = self._buf.find(_CLOSERS[opener], after)
        if end < 0:
            if final:
                self._give_up(out, opener + self._buf, "")
            return False
        closer = _CLOSERS[opener]
        raw = opener + self._buf[:end] + closer
        self._complete(out, _single_call(self._buf[:end]), raw, self._buf[end + len(closer):])
        return True

    def _mistral_step(self, out: list[ParseEvent], final: bool) -> bool:
        body = self._buf
        start = len(body) - len(body.lstrip())
        if start < len(body) and body[start] in "[{":
            end = json_end(body, start)
            if end is not None:
                raw = MISTRAL_OPEN + body[:end]
                self._complete(out, _call_list(body[start:end]), raw, body[end:])
                return True
        elif (args := body.find(MISTRAL_ARGS)) >= 0:
            return self._mistral_named_step(out, final, args)
        if final:
            self._give_up(out, MISTRAL_OPEN + body, "")
        return False

    def _mistral_named_step(self, out: list[ParseEvent], final: bool, args: int) -> bool:
        """Newer Mistral: `[TOOL_CALLS]name[ARGS]{json}`, optionally with `[CALL_ID]id`."""
        body, cut = self._buf, args + len(MISTRAL_ARGS)
        start = len(body) - len(body[cut:].lstrip())
        if start < len(body) and body[start] != "{":
            # Not `{json}` after [ARGS]: the marker part is plain text, the rest reads on.
            self._give_up(out, MISTRAL_OPEN + body[:cut], body[cut:])
            return True
        end = json_end(body, start) if start < len(body) else None
        if end is None:
            if final:
                self._give_up(out, MISTRAL_OPEN + body, "")
            return False
        name = body[:args].split(MISTRAL_CALL_ID)[0].strip()
        calls = _named_call(name, body[start:end])
        self._complete(out, calls, MISTRAL_OPEN + body[:end], body[end:])
        return True

    def _to_end_step(self, out: list[ParseEvent], final: bool) -> bool:
        """Llama 3: the call (bare, or after <|python_tag|>) is the rest of the reply."""
        if not final:
            return False
        raw = (self._opener or "") + self._buf
        calls = _json_calls(self._buf)
        if calls is None and (closed := close_json(self._buf.strip())) is not None:
            calls = _json_calls(closed)  # a reply that ended a brace short
        self._complete(out, calls, raw, "")
        return True

    def _loose_step(self, out: list[ParseEvent], final: bool) -> bool:
        """A call written loosely: held back until it is decided, then calls or content."""
        grown = self._buf[self._scanned:]
        if not final and len(self._buf) > _LOOSE_SHORT and _LOOSE_TRIGGERS.isdisjoint(grown):
            self._scanned = len(self._buf)
            return False  # nothing that could decide it has arrived: don't scan it again
        self._scanned = len(self._buf)
        found = loose.scan(self._buf, self.offered, final)
        if found.verdict == "wait":
            return False
        if found.verdict == "text":
            self._give_up(out, self._buf[:found.length], self._buf[found.length:])
            return True
        raw, rest = self._buf[:found.length], self._buf[found.length:]
        self._complete(out, found.calls, raw, rest, recovered=True)
        return True

    def _complete(self, out: list[ParseEvent], calls: list[_Call] | None, raw: str,
                  rest: str, recovered: bool = False) -> None:
        """End the current call: events for its calls, or its raw text as content."""
        if not calls:
            self._give_up(out, raw, rest)
            return
        self._blank = ""  # whitespace before a call only separated it
        for name, arguments in calls:
            self._emit_call(out, name, arguments, raw, recovered)
        self._separating, self._opener, self._buf = True, None, rest

    def _give_up(self, out: list[ParseEvent], raw: str, rest: str) -> None:
        # As LM Studio does, a call that doesn't parse is returned as ordinary content.
        self._opener, self._buf = None, rest
        self._content(out, raw)

    def _emit_call(self, out: list[ParseEvent], name: str, arguments: dict[str, Any],
                   raw: str, recovered: bool = False) -> None:
        index, call_id = len(self.calls), self._new_id()
        out.append(CallStart(index, call_id, name))
        text = json.dumps(arguments, ensure_ascii=False)
        out.extend(CallArgs(index, text[i:i + _ARGS_FRAGMENT])
                   for i in range(0, len(text), _ARGS_FRAGMENT))
        end = CallEnd(index, call_id, name, arguments, raw, recovered)
        self.calls.append(end)
        out.append(end)

    def _new_id(self) -> str:
        taken = {c.id for c in self.calls}
        while (call_id := f"{self._id_prefix}{self._rng.randrange(10**9):09d}") in taken:
            pass
        return call_id


def _partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a marker."""
    for size in range(min(len(text), max(len(m) for m in markers) - 1), 0, -1):
        if any(m.startswith(text[-size:]) for m in markers):
            return size
    return 0


def _call_fields(obj: Any, require_arguments: bool = False) -> _Call | None:
    """(name, arguments) of one call object, or None when it isn't a well-formed call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    for key in ("arguments", "parameters"):
        if key in obj:
            return (obj["name"], obj[key]) if isinstance(obj[key], dict) else None
    return None if require_arguments else (obj["name"], {})


def _loads(text: str) -> Any:
    try:
        # small models put raw newlines and tabs inside strings: accept them
        return json.loads(text, strict=False)
    except ValueError:
        return None


def _single_call(body: str) -> list[_Call] | None:
    call = _call_fields(_loads(body.strip()))
    return [call] if call else None


def _call_list(body: str) -> list[_Call] | None:
    """Mistral's `[{call}, ...]` (or a lone `{call}`): every element must be a call."""
    value = _loads(body)
    items = value if isinstance(value, list) else [value]
    calls = [call for item in items if (call := _call_fields(item))]
    return calls if calls and len(calls) == len(items) else None


def _named_call(name: str, arguments: str) -> list[_Call] | None:
    value = _loads(arguments)
    if not name or any(c.isspace() for c in name) or not isinstance(value, dict):
        return None
    return [(name, value)]


def _json_calls(body: str) -> list[_Call] | None:
    """Llama 3 calls: JSON objects, optionally separated by `;`, and nothing else."""
    decoder, calls, pos = json.JSONDecoder(strict=False), [], 0
    text = body.strip()
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        # A bare JSON reply can be an ordinary answer, so it must name its parameters.
        call = _call_fields(value, require_arguments=True)
        if call is None:
            return None
        calls.append(call)
        pos = len(text) - len(text[pos:].lstrip().removeprefix(";").lstrip())
    return calls or None
