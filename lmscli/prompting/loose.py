"""Tool calls that small models write loosely: bare JSON, a ```json fence, or a list of them.

A tool-trained small model (Qwen2.5-Coder 0.5B, say) often answers a tool request with
``{"name": "f", "arguments": {...}}`` in a code fence instead of its template's call markers.
When tools were offered, such a reply, or its tail after some text, is a call if every object
names an offered tool and has an ``arguments`` (or ``parameters``) object. Anything else stays
text, so a JSON answer that names no offered tool is never taken for a call.

The scan is pure and restartable: given the text from where a loose call may begin, it says
"wait" (the text so far could still become a call), "text" (the first n characters are not
one), or "calls" (the text is, up to its end, one or more calls).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

FENCE = "```"
# Where a loose call may begin: a fence, an object whose first key is a string, or a list of
# such objects.
_START = re.compile(r'```|\{\s*"|\[\s*\{\s*"')
# The end of a text that could still grow into a start.
_PARTIAL_START = re.compile(r'(?:`{1,2}|\{\s*|\[\s*(?:\{\s*)?)\Z')
_FENCE_LANG = re.compile(r"[A-Za-z0-9_+-]*")
# The object's first key and, when it is "name", its value (the key order models use).
_FIRST_KEY = re.compile(r'\[?\s*\{\s*"((?:[^"\\]|\\.)*)(")?\s*(:)?\s*(?:"((?:[^"\\]|\\.)*)(")?)?')
_CALL_KEYS = ("name", "arguments", "parameters")
_MAX_KEY_CHARS = 64  # a first key longer than any call key: not a call, stop holding it back

Verdict = Literal["wait", "text", "calls"]
LooseCall = tuple[str, dict[str, Any]]


@dataclass
class Scan:
    verdict: Verdict
    length: int = 0  # "text": characters that are plain text; "calls": characters consumed
    calls: list[LooseCall] = field(default_factory=list)


_WAIT = Scan("wait")


def find_start(text: str, pos: int = 0) -> int:
    """Index of the first place at or after ``pos`` where a loose call may begin, or -1."""
    match = _START.search(text, pos)
    return match.start() if match else -1


def partial_start_length(text: str) -> int:
    """Length of the end of ``text`` that may still become the beginning of a loose call."""
    match = _PARTIAL_START.search(text)
    return len(match.group(0)) if match else 0


def scan(text: str, offered: Collection[str], final: bool) -> Scan:
    """Decide what ``text`` (which begins where ``find_start`` pointed) is."""
    pos, calls = 0, []
    while True:
        block = _block(text, pos, offered, final)
        if block.verdict == "wait":
            return _WAIT
        if block.verdict == "text":
            # calls before a non-call are not the reply's tail: all of it is text
            return Scan("text", pos) if calls else block
        calls += block.calls
        pos = block.length
        rest = text[pos:].lstrip()
        if not rest:
            return Scan("calls", len(text), calls) if final else _WAIT
        nxt = len(text) - len(rest)
        if _START.match(text, nxt):
            pos = nxt  # another call may follow: read it before deciding
        elif not final and _PARTIAL_START.fullmatch(rest):
            return _WAIT
        else:
            return Scan("text", nxt)


def _block(text: str, pos: int, offered: Collection[str], final: bool) -> Scan:
    """One fenced or bare JSON value at ``pos``: "calls" with the index after it."""
    fenced = text.startswith(FENCE, pos)
    opener = len(FENCE) if fenced else 1
    body = _fence_body(text, pos, final) if fenced else pos
    if body is None:
        return _WAIT
    if body < 0:
        return Scan("text", pos + opener)
    end = json_end(text, body)
    if end is None:
        if final:
            return _closed_at_end(text, pos, body, offered, fenced)
        if not _could_be_call(text, body, offered):
            return Scan("text", pos + opener)
        return _WAIT
    calls = parse_calls(text[body:end], offered)
    if calls is None:
        return Scan("text", pos + opener if fenced else end)
    if not fenced:
        return Scan("calls", end, calls)
    return _fence_close(text, pos, end, calls, final)


def _closed_at_end(text: str, pos: int, body: int, offered: Collection[str],
                   fenced: bool) -> Scan:
    """A call whose reply ended before its last brackets: small models often stop one brace
    short (``{"name": "f", "arguments": {"x": 1}``). Closed, it is a call if it parses as one."""
    stop = text.find(FENCE, body) if fenced else -1
    stop = len(text) if stop < 0 else stop
    closed = close_json(text[body:stop].rstrip())
    calls = parse_calls(closed, offered) if closed is not None else None
    if calls is None:
        return Scan("text", pos + (len(FENCE) if fenced else 1))
    return Scan("calls", min(stop + len(FENCE), len(text)) if fenced else len(text), calls)


def _fence_body(text: str, pos: int, final: bool) -> int | None:
    """Where a ```json (or bare ```) fence's JSON begins; -1: not JSON; None: can't tell yet."""
    lang_end = _FENCE_LANG.match(text, pos + len(FENCE)).end()  # type: ignore[union-attr]
    lang = text[pos + len(FENCE):lang_end].lower()
    if lang_end == len(text) and not final and "json".startswith(lang):
        return None  # "```js" may still become "```json"
    if lang not in ("", "json"):
        return -1
    body = len(text) - len(text[lang_end:].lstrip())
    if body == len(text):
        return -1 if final else None
    return body if text[body] in "{[" else -1


def _fence_close(text: str, pos: int, end: int, calls: list[LooseCall], final: bool) -> Scan:
    close = len(text) - len(text[end:].lstrip())
    if text.startswith(FENCE, close):
        return Scan("calls", close + len(FENCE), calls)
    if close == len(text):
        # a reply that ends before its closing fence still ends with the call
        return Scan("calls", close, calls) if final else _WAIT
    if not final and FENCE.startswith(text[close:]):
        return _WAIT
    return Scan("text", pos + len(FENCE))


def _could_be_call(text: str, body: int, offered: Collection[str]) -> bool:
    """Whether the unfinished JSON at ``body`` may still be a call, judged by its first key
    (and by the name, when that comes first), so that other JSON is not held back long."""
    match = _FIRST_KEY.match(text, body)
    if match is None:
        return True  # `{` or `[{` and white space so far: the start pattern saw a quote
    key, key_closed, colon, name, name_closed = match.groups()
    if not key_closed:
        return len(key) <= _MAX_KEY_CHARS
    key = _unescape(key)
    at_end = match.end() == len(text)  # nothing but what the pattern read has arrived
    if key not in _CALL_KEYS or (colon is None and not at_end):
        return False
    if key != "name" or colon is None:
        return True
    if name is None:
        return at_end  # a name that is not a string: not a call
    return not name_closed or _unescape(name) in offered


def _unescape(text: str) -> str | None:
    try:
        return json.loads(f'"{text}"', strict=False)
    except ValueError:
        return None


def parse_calls(text: str, offered: Collection[str]) -> list[LooseCall] | None:
    """The calls in one JSON object, or in a list of them; None unless every one is a call."""
    try:
        # small models put raw newlines and tabs inside strings: accept them
        value = json.loads(text, strict=False)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call for item in items if (call := _call(item, offered))]
    return calls if calls and len(calls) == len(items) else None


def _call(item: Any, offered: Collection[str]) -> LooseCall | None:
    if not isinstance(item, dict) or item.get("name") not in offered:
        return None
    for key in ("arguments", "parameters"):
        if isinstance(item.get(key), dict):
            return item["name"], item[key]
    return None


def close_json(text: str) -> str | None:
    """``text``, an array or object cut short outside a string, with its closers added."""
    closers: list[str] = []
    for _, char in _brackets(text):
        if char == '"':
            return None  # cut inside a string
        if char in "[{":
            closers.append("]" if char == "[" else "}")
        elif closers:
            closers.pop()
    return text + "".join(reversed(closers)) if closers else None


def json_end(text: str, start: int) -> int | None:
    """Index just past the JSON array/object opening at ``start``, or None if it's open."""
    depth = 0
    for i, char in _brackets(text, start):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _brackets(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The brackets from ``start`` on that stand outside JSON strings, then ``(len(text),
    '"')`` if the text ends inside a string."""
    in_string, escaped = False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[]{}":
            yield i, char
    if in_string:
        yield len(text), '"'
