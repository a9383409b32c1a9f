"""Writing GBNF text safely: literals and character classes with every special escaped."""

from __future__ import annotations

import unicodedata

MAX_CODE_POINT = 0x10FFFF
MAX_REPEAT = 1000  # llama.cpp refuses repetitions past 2000; nobody needs 1000 list items
# Planes 4 to 13 hold no characters at all. A vocabulary learned from text may have no token
# for their first UTF-8 byte, and a grammar that requires one leaves the sampler no token to
# pick: llama.cpp then aborts the process.
UNASSIGNED_PLANES: list[tuple[int, int]] = [(0x40000, 0xDFFFF)]
Ranges = list[tuple[int, int]]

_LITERAL_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def literal(text: str) -> str:
    """``text`` as a GBNF string literal. Raises ValueError for a lone surrogate, which has
    no UTF-8 form, and for a code point no character is assigned to, which a model's
    vocabulary may have no way to write (see UNASSIGNED_PLANES)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _LITERAL_ESCAPES:
            out.append(_LITERAL_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"a lone surrogate (\\u{code:04x}) is not a character")
        elif unicodedata.category(ch) == "Cn":
            raise ValueError(f"U+{code:04X} is not an assigned character")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def char_class(ranges: Ranges, negated: bool = False) -> str:
    """``[a-z...]`` (or ``[^...]``) for inclusive code point ranges."""
    body = "".join(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
                   for lo, hi in merge(ranges))
    return f"[{'^' if negated else ''}{body}]"


def _class_char(code: int) -> str:
    # letters and digits as they are; everything else escaped, so that no `]`, `-`, `^` or
    # backslash can end or change the class
    if code < 0x80 and chr(code).isalnum():
        return chr(code)
    if code <= 0xFF:
        return f"\\x{code:02X}"
    if code <= 0xFFFF:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def merge(ranges: Ranges) -> Ranges:
    """Sorted, with overlapping and touching ranges joined."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    """The code points of ``ranges`` that are not in ``removed``."""
    out: Ranges = []
    for lo, hi in merge(ranges):
        for r_lo, r_hi in merge(removed):
            if r_hi < lo or r_lo > hi:
                continue
            if r_lo > lo:
                out.append((lo, r_lo - 1))
            lo = r_hi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


def contains(ranges: Ranges, code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def repeat(low: int, high: int | None) -> str:
    """The GBNF suffix for ``low`` to ``high`` (None: any number of) repetitions."""
    if (low, high) == (0, None):
        return "*"
    if (low, high) == (1, None):
        return "+"
    if (low, high) == (0, 1):
        return "?"
    if high is None:
        return f"{{{low},}}"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"
