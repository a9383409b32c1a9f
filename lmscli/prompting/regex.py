"""JSON Schema ``pattern`` regexes → GBNF for the text between a JSON string's quotes.

The subset that schemas use in practice: literals, ``.``, classes with ranges, ``\\d \\w \\s``
and their negations, groups (capturing, ``(?:``, named), alternation, the quantifiers
``* + ? {n} {n,} {n,m}`` (lazy or not: the language is the same), and ``^``/``$`` at the ends
of a top-level alternative. Without ``^`` or ``$`` a pattern matches anywhere in the string,
as JSON Schema says. Lookaround, backreferences, word boundaries and Unicode properties are a
RegexError.

The grammar writes JSON text, so a ``"``, a backslash or a control character the pattern
allows is written as its JSON escape. A control character without a short escape (``\\n``,
``\\t``...) is left out of classes: models don't write them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from lmscli.prompting.gbnf import (
    MAX_CODE_POINT,
    MAX_REPEAT,
    UNASSIGNED_PLANES,
    Ranges,
    char_class,
    contains,
    literal,
    merge,
    repeat,
)
from lmscli.prompting.gbnf import subtract as subtract_ranges

MAX_PATTERN_CHARS = 2000
MAX_GROUP_DEPTH = 32

DIGIT: Ranges = [(0x30, 0x39)]
WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                 (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
                 (0xFEFF, 0xFEFF)]
SHORTHANDS = {"d": DIGIT, "w": WORD, "s": SPACE}
SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "0": "\0"}
# What JSON text can't hold raw inside a string, and the escapes JSON has for some of it.
NOT_RAW: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                "\t": "\\t"}
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")
_HEX = re.compile(r"[0-9a-fA-F]+")


class RegexError(ValueError):
    """A pattern outside the supported subset."""


def pattern_gbnf(pattern: str, any_char: str, add_rule: Callable[[str], str], *,
                 whole: bool = False) -> str:
    """GBNF for the JSON-escaped contents of a string matching ``pattern``. ``any_char`` is
    the grammar's rule for one JSON string character (unanchored ends repeat it);
    ``add_rule`` makes a rule of a GBNF body and returns its name. ``whole``: the pattern
    matches the whole string, as if anchored at both ends."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexError(f"patterns are limited to {MAX_PATTERN_CHARS} characters")
    return _Parser(pattern, any_char, add_rule, whole).top()


class _Parser:
    def __init__(self, source: str, any_char: str, add_rule: Callable[[str], str],
                 whole: bool = False) -> None:
        self.s = source
        self.whole = whole
        self.i = 0
        self.depth = 0
        self.any_char = any_char
        self.add_rule = add_rule

    # -- structure -------------------------------------------------------------------------

    def top(self) -> str:
        alternatives = []
        while True:
            anchored_start = self.eat("^") or self.whole
            body = self.sequence()
            anchored_end = self.eat("$") or self.whole
            if self.i < len(self.s) and self.peek() != "|":
                raise self.error("unexpected character")
            head = "" if anchored_start else f"{self.any_char}* "
            tail = "" if anchored_end else f" {self.any_char}*"
            alternatives.append(f"{head}{body}{tail}")
            if not self.eat("|"):
                break
        return alternatives[0] if len(alternatives) == 1 else \
            "( " + " | ".join(alternatives) + " )"

    def alternation(self) -> str:
        options = [self.sequence()]
        while self.eat("|"):
            options.append(self.sequence())
        return options[0] if len(options) == 1 else "( " + " | ".join(options) + " )"

    def sequence(self) -> str:
        items = []
        while self.i < len(self.s) and self.peek() not in "|)":
            if self.peek() == "$" and self.depth == 0 and self.s[self.i + 1:self.i + 2] in \
                    ("", "|"):
                break  # the end anchor: top() takes it
            items.append(self.quantified(self.atom()))
        return " ".join(items) if items else '""'

    def atom(self) -> str:
        c = self.take()
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == ".":
            return _set_gbnf([(0x0A, 0x0A), (0x0D, 0x0D)], negated=True)
        if c == "\\":
            return self.escape()
        if c in "^$":
            raise self.error(f"{c!r} is only supported at the start or end of the pattern")
        if c in "*+?":
            raise self.error("nothing to repeat")
        return _char_gbnf(c)

    def group(self) -> str:
        if self.eat("?"):
            if self.eat(":"):
                pass
            elif self.eat("P<") or (self.peek() == "<" and self.s[self.i + 1:self.i + 2]
                                    not in ("=", "!") and self.eat("<")):
                self.name()
            else:
                raise self.error("lookaround and inline flags are not supported")
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise self.error(f"groups nest deeper than {MAX_GROUP_DEPTH}")
        inner = self.alternation()
        self.depth -= 1
        if not self.eat(")"):
            raise self.error("unbalanced parenthesis")
        return f"( {inner} )"

    def name(self) -> None:
        end = self.s.find(">", self.i)
        if end < 0:
            raise self.error("unterminated group name")
        self.i = end + 1

    def quantified(self, atom: str) -> str:
        span = self.quantifier()
        if span is None:
            return atom
        low, high = span
        self.eat("?")  # lazy: the same strings, only matched differently
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.match_count()):
            raise self.error("nothing to repeat")
        if high == 0:
            return '""'
        if atom.startswith("("):
            # llama.cpp caps repetitions times the rules inside a group; a rule is one
            atom = self.add_rule(atom)
        return f"{atom}{repeat(low, high)}"

    def quantifier(self) -> tuple[int, int | None] | None:
        for mark, span in (("*", (0, None)), ("+", (1, None)), ("?", (0, 1))):
            if self.eat(mark):
                return span
        m = self.match_count()
        if m is None:
            return None
        self.i = m.end()
        low = int(m.group(1))
        high = low if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
        if low > MAX_REPEAT:
            raise self.error(f"repeats at most {MAX_REPEAT} times are supported")
        if high is not None and high < low:
            raise self.error("numbers out of order in {} quantifier")
        # past MAX_REPEAT only the lower bound is kept: llama.cpp can't count that far
        return low, high if high is None or high <= MAX_REPEAT else None

    def match_count(self) -> re.Match[str] | None:
        return _QUANTIFIER.match(self.s, self.i)

    # -- characters ------------------------------------------------------------------------

    def escape(self) -> str:
        c = self.take()
        if c in SHORTHANDS:
            return _set_gbnf(SHORTHANDS[c])
        if c.lower() in SHORTHANDS:
            return _set_gbnf(SHORTHANDS[c.lower()], negated=True)
        return _char_gbnf(chr(self.escaped_code(c)))

    def escaped_code(self, c: str) -> int:
        """The code point of an escape (after its backslash) that stands for one character."""
        if c in SIMPLE_ESCAPES:
            if c == "0" and self.peek().isdigit():
                raise self.error("octal escapes are not supported")
            return ord(SIMPLE_ESCAPES[c])
        if c == "x":
            return self.hex_digits(2)
        if c == "u":
            if self.eat("{"):
                code = self.hex_run()
                if not self.eat("}"):
                    raise self.error("unterminated \\u{...}")
                return code
            return self.hex_digits(4)
        if c.isalnum() or c == "_":
            raise self.error(f"\\{c} is not supported (word boundaries, backreferences and "
                             "Unicode properties are not)")
        return ord(c)  # an escaped punctuation character stands for itself

    def hex_digits(self, n: int) -> int:
        digits = self.s[self.i:self.i + n]
        if len(digits) != n or not _HEX.fullmatch(digits):
            raise self.error("bad hexadecimal escape")
        self.i += n
        return _checked(int(digits, 16), self)

    def hex_run(self) -> int:
        m = _HEX.match(self.s, self.i)
        if m is None or len(m.group(0)) > 6:
            raise self.error("bad \\u{...} escape")
        self.i = m.end()
        return _checked(int(m.group(0), 16), self)

    def char_class(self) -> str:
        negated = self.eat("^")
        ranges: Ranges = []
        while not self.eat("]"):
            if self.i >= len(self.s):
                raise self.error("unterminated character class")
            lo = self.class_atom()
            if isinstance(lo, list):
                ranges += lo
                continue
            hi = lo
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if isinstance(hi, list):
                    raise self.error("a class shorthand can't end a range")
                if hi < lo:
                    raise self.error("range out of order in character class")
            ranges.append((lo, hi))
        if not ranges and not negated:
            raise self.error("an empty character class matches nothing")
        return _set_gbnf(ranges, negated)

    def class_atom(self) -> int | Ranges:
        c = self.take()
        if c != "\\":
            return ord(c)
        c = self.take()
        if c in SHORTHANDS:
            return SHORTHANDS[c]
        if c.lower() in SHORTHANDS:
            raise self.error(f"\\{c} inside a character class is not supported")
        if c == "b":
            return 0x08  # backspace, inside a class
        if c == "-":
            return ord("-")
        return self.escaped_code(c)

    # -- cursor ----------------------------------------------------------------------------

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        if self.i >= len(self.s):
            raise self.error("the pattern ends too early")
        self.i += 1
        return self.s[self.i - 1]

    def eat(self, text: str) -> bool:
        if self.s.startswith(text, self.i):
            self.i += len(text)
            return True
        return False

    def error(self, message: str) -> RegexError:
        return RegexError(f"{message} (at index {self.i})")


def _checked(code: int, parser: _Parser) -> int:
    if code > MAX_CODE_POINT or 0xD800 <= code <= 0xDFFF:
        raise parser.error("the escape is not a Unicode character")
    return code


def _char_gbnf(c: str) -> str:
    """One character as the JSON text that writes it."""
    try:
        return literal(json.dumps(c, ensure_ascii=False)[1:-1])
    except ValueError as exc:
        raise RegexError(str(exc)) from None


def _set_gbnf(ranges: Ranges, negated: bool = False) -> str:
    """A set of characters as GBNF alternatives: a class of the characters JSON writes as they
    are, plus the escapes of the special ones in the set."""
    ranges = merge(ranges)
    if negated:
        raw = char_class(ranges + NOT_RAW, negated=True)
        if subtract_ranges([(0, MAX_CODE_POINT)], ranges + NOT_RAW) == []:
            raw = ""
        escaped = [e for c, e in JSON_ESCAPES.items() if not contains(ranges, ord(c))]
    else:
        # no class may require what a vocabulary can't write (see UNASSIGNED_PLANES)
        safe = subtract_ranges(ranges, NOT_RAW + UNASSIGNED_PLANES)
        raw = char_class(safe) if safe else ""
        escaped = [e for c, e in JSON_ESCAPES.items() if contains(ranges, ord(c))]
    options = ([raw] if raw else []) + [literal(e) for e in escaped]
    if not options:
        raise RegexError("a character class matches no character a JSON string can hold")
    return options[0] if len(options) == 1 else "( " + " | ".join(options) + " )"

