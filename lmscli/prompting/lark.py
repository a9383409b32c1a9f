"""The grammars of freeform tools (OpenAI's ``custom`` tools: Lark or a regex) → GBNF for the
JSON-escaped text of a string, so that a forced call's ``input`` argument follows them.

The Lark subset is what such grammars use: rules and terminals (``name: …``, ``NAME: …``,
with ``?``/``!`` rule marks and ``.n`` priorities ignored), alternatives on continuation lines,
strings (``"…"``), string ranges (``"a".."z"``), ``/regex/``, groups, ``[optional]``, ``? * +``,
``~ n`` and ``~ n..m``, ``-> alias`` (ignored) and ``%import common.NAME`` / ``%import common
(A, B)``. ``%ignore`` is skipped: what the grammar generates then has no extra whitespace,
which the grammar still accepts. Templates, ``%declare`` and flags on strings or regexes are a
GrammarSyntaxError. A regex matches a whole terminal (regex.py's subset).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from lmscli.prompting.gbnf import literal, repeat
from lmscli.prompting.regex import RegexError, pattern_gbnf

MAX_DEFINITION_CHARS = 20_000
MAX_NESTING = 32
# Lark's own common.lark, for the terminals grammars import from it
COMMON = r"""
DIGIT: "0".."9"
HEXDIGIT: "a".."f" | "A".."F" | DIGIT
INT: DIGIT+
SIGNED_INT: ["+"|"-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e"|"E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+"|"-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+"|"-"] NUMBER
ESCAPED_STRING: /"(?:[^"\\\n]|\\.)*"/
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_"|LETTER) ("_"|LETTER|DIGIT)*
WS_INLINE: (" "|/\t/)+
WS: /[ \t\f\r\n]/+
CR: "\r"
LF: "\n"
NEWLINE: (CR? LF)+
"""
_TOKEN = re.compile(r"""
    (?P<space>[ \t\f\r]+|//[^\n]*)
  | (?P<newline>\n)
  | (?P<directive>%[a-z]+)
  | (?P<arrow>->)
  | (?P<range>\.\.)
  | (?P<string>"(?:[^"\\\n]|\\.)*"[a-z]*)
  | (?P<regexp>/(?:[^/\\\n]|\\.)+/[a-z]*)
  | (?P<name>[?!]?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:\.-?\d+)?)
  | (?P<number>\d+)
  | (?P<op>[:|()\[\]?*+~,])
""", re.VERBOSE)


class GrammarSyntaxError(ValueError):
    """A grammar outside the supported subset, or not a grammar at all."""


def regex_input_gbnf(pattern: str) -> str:
    """GBNF (with ``root``) for the JSON-escaped text of a string that ``pattern`` matches
    whole."""
    rules = _LarkRules()
    try:
        body = pattern_gbnf(pattern, "", rules.add, whole=True)
    except RegexError as exc:
        raise GrammarSyntaxError(f"the regex is not supported: {exc}") from None
    return rules.text(body)


def lark_input_gbnf(definition: str) -> str:
    """GBNF (with ``root``) for the JSON-escaped text of a string that the Lark grammar's
    ``start`` rule generates."""
    if len(definition) > MAX_DEFINITION_CHARS:
        raise GrammarSyntaxError(f"grammars are limited to {MAX_DEFINITION_CHARS} characters")
    grammar = _parse(definition)
    if "start" not in grammar.rules:
        raise GrammarSyntaxError("the grammar has no 'start' rule")
    common = _parse(COMMON).rules
    unknown = [name for name in grammar.imported if name not in common]
    if unknown:
        raise GrammarSyntaxError(f"common.{unknown[0]} is not a terminal this server knows")
    for name, rule in common.items():  # the imported terminals, and those they use in turn
        grammar.rules.setdefault(name, rule)
    rules = _LarkRules()
    reached = _reachable(grammar.rules, "start")
    for name in reached:
        rules.named[_rule_name(name)] = _LarkWriter(rules).expansions(grammar.rules[name])
    return rules.text(_rule_name("start"))


# -- parsing ---------------------------------------------------------------------------------

Node = tuple  # ("alt", [seq]) | ("seq", [node]) | ("rep", node, lo, hi) | ("str", s) |
# ("range", a, b) | ("re", pattern) | ("ref", name)


@dataclass
class _LarkGrammar:
    rules: dict[str, Node] = field(default_factory=dict)
    imported: list[str] = field(default_factory=list)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            line = text.count("\n", 0, i) + 1
            raise GrammarSyntaxError(f"unexpected {text[i]!r} on line {line}")
        kind = m.lastgroup or ""
        if kind != "space":
            out.append((kind, m.group()))
        i = m.end()
    return out + [("newline", "\n"), ("end", "")]


class _LarkParser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, kind: str, value: str | None = None) -> str:
        got_kind, got = self.take()
        if got_kind != kind or (value is not None and got != value):
            raise GrammarSyntaxError(f"expected {value or kind}, found {got or 'the end'!r}")
        return got

    def skip_newlines(self, continuation: bool = False) -> None:
        """Newlines end a definition, but a line that starts with ``|`` continues it."""
        while self.peek()[0] == "newline" and (
                not continuation or self.peek(1) == ("op", "|")
                or self.peek(1)[0] == "newline"):
            self.take()

    def grammar(self) -> _LarkGrammar:
        out = _LarkGrammar()
        while True:
            self.skip_newlines()
            kind, value = self.peek()
            if kind == "end":
                return out
            if kind == "directive":
                self.directive(out)
                continue
            name = self.expect("name").lstrip("?!").split(".")[0]
            self.expect("op", ":")
            if name in out.rules:
                raise GrammarSyntaxError(f"{name!r} is defined twice")
            out.rules[name] = self.expansions(top=True)
            if self.peek()[0] != "newline":
                raise GrammarSyntaxError(f"unexpected {self.peek()[1]!r} in {name!r}")

    def directive(self, out: _LarkGrammar) -> None:
        _, name = self.take()
        words = []
        while self.peek()[0] != "newline":
            words.append(self.take()[1])
        if name == "%ignore":
            return
        if name != "%import" or not words or not words[0].startswith("common"):
            raise GrammarSyntaxError(f"{name} {' '.join(words)} is not supported "
                                     "(only %import common… and %ignore)")
        if words[0].startswith("common."):
            out.imported.append(words[0].removeprefix("common."))
            return
        out.imported += [w for w in words[1:] if w not in ("(", ")", ",")]

    def expansions(self, top: bool = False) -> Node:
        options = [self.alias(top)]
        while True:
            if top:
                self.skip_newlines(continuation=True)
            if self.peek() != ("op", "|"):
                break
            self.take()
            options.append(self.alias(top))
        return options[0] if len(options) == 1 else ("alt", options)

    def alias(self, top: bool) -> Node:
        items = []
        while True:
            if not top:
                self.skip_newlines()  # inside brackets lines don't end anything
            kind, value = self.peek()
            if kind in ("string", "regexp", "name") or value in ("(", "["):
                items.append(self.repeated(self.atom()))
            else:
                break
        if self.peek()[0] == "arrow":
            self.take()
            self.expect("name")
        return items[0] if len(items) == 1 else ("seq", items)

    def repeated(self, atom: Node) -> Node:
        kind, value = self.peek()
        if (kind, value) in (("op", "?"), ("op", "*"), ("op", "+")):
            self.take()
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[value]
            return ("rep", atom, low, high)
        if value == "~":
            self.take()
            low = high = int(self.expect("number"))
            if self.peek()[0] == "range":
                self.take()
                high = int(self.expect("number"))
            if high < low:
                raise GrammarSyntaxError("a ~ range is out of order")
            return ("rep", atom, low, high)
        return atom

    def atom(self) -> Node:
        kind, value = self.take()
        if value in ("(", "["):
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise GrammarSyntaxError(f"groups nest deeper than {MAX_NESTING}")
            inner = self.expansions()
            self.skip_newlines()
            self.expect("op", ")" if value == "(" else "]")
            self.depth -= 1
            return inner if value == "(" else ("rep", inner, 0, 1)
        if kind == "string":
            text = _string(value)
            if self.peek()[0] == "range":
                self.take()
                end = _string(self.expect("string"))
                if len(text) != 1 or len(end) != 1 or end < text:
                    raise GrammarSyntaxError(f"{value}..{end!r} is not a character range")
                return ("range", text, end)
            return ("str", text)
        if kind == "regexp":
            body, _, flags = value[1:].rpartition("/")
            if flags:
                raise GrammarSyntaxError(f"regex flags ({flags}) are not supported")
            return ("re", body.replace("\\/", "/"))
        if "." in value or value[0] in "?!":
            raise GrammarSyntaxError(f"{value!r} can't be used inside a rule")
        return ("ref", value)


def _string(token: str) -> str:
    if not token.endswith('"'):
        raise GrammarSyntaxError(f"string flags are not supported: {token}")
    try:
        value = json.loads(token)
    except ValueError:
        value = token[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    if not isinstance(value, str):
        raise GrammarSyntaxError(f"bad string {token}")
    return value


def _parse(text: str) -> _LarkGrammar:
    return _LarkParser(text).grammar()


def _reachable(rules: dict[str, Node], start: str) -> list[str]:
    seen: list[str] = []
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in rules:
            raise GrammarSyntaxError(f"{name!r} is used but never defined")
        seen.append(name)
        todo += _refs(rules[name])
    return seen


def _refs(node: Node) -> list[str]:
    kind = node[0]
    if kind == "ref":
        return [node[1]]
    if kind in ("alt", "seq"):
        return [r for child in node[1] for r in _refs(child)]
    if kind == "rep":
        return _refs(node[1])
    return []


# -- writing GBNF ----------------------------------------------------------------------------

def _rule_name(name: str) -> str:
    # GBNF names are letters, digits and dashes; "_" becomes "--", which Lark names can't hold
    return "lark-" + name.replace("_", "--")


class _LarkRules:
    def __init__(self) -> None:
        self.named: dict[str, str] = {}
        self.helpers: list[str] = []

    def add(self, body: str) -> str:
        name = f"lark-part-{len(self.helpers)}"
        self.helpers.append(f"{name} ::= {body}")
        return name

    def text(self, root: str) -> str:
        lines = [f"root ::= {root}"] + [f"{n} ::= {b}" for n, b in self.named.items()]
        return "\n".join(lines + self.helpers) + "\n"


class _LarkWriter:
    def __init__(self, rules: _LarkRules) -> None:
        self.rules = rules

    def expansions(self, node: Node) -> str:
        kind = node[0]
        if kind == "alt":
            return "( " + " | ".join(self.expansions(n) for n in node[1]) + " )"
        if kind == "seq":
            return " ".join(self.expansions(n) for n in node[1]) or '""'
        if kind == "rep":
            inner = self.expansions(node[1])
            if " " in inner or inner.startswith("("):
                inner = self.rules.add(inner)
            return f"{inner}{repeat(node[2], node[3])}"
        if kind == "ref":
            return _rule_name(node[1])
        if kind == "str":
            return _json_text(node[1])
        if kind == "range":
            return self.regex(f"[{re.escape(node[1])}-{re.escape(node[2])}]")
        return self.regex(node[1])

    def regex(self, pattern: str) -> str:
        try:
            return "( " + pattern_gbnf(pattern, "", self.rules.add, whole=True) + " )"
        except RegexError as exc:
            raise GrammarSyntaxError(f"/{pattern}/ is not supported: {exc}") from None


def _json_text(text: str) -> str:
    """A literal as the JSON-escaped text that writes it."""
    if not text:
        return '""'
    try:
        return literal(json.dumps(text, ensure_ascii=False)[1:-1])
    except ValueError as exc:
        raise GrammarSyntaxError(str(exc)) from None
