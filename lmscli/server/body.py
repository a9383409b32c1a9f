"""Request bodies: JSON parsed so that every way it can be malformed is a 400 (never a 500),
and ``Body``, typed access to its fields where every failure names the field."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lmscli.server.errors import APIError, bad_request, shorten

# Deeper than any real request; recursive code downstream (schemas, templates) stays safe.
MAX_DEPTH = 64
INT64 = 2**63
# `\ud800`..`\udfff` escapes: only a body that has one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, every way it can be malformed a 400 (never a 500).

    Strict UTF-8 first: json.loads on bytes would let encoded surrogates through.
    """
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not valid UTF-8: {exc.reason} at byte "
                          f"{exc.start}.") from None
    try:
        data = json.loads(text, parse_constant=_no_constant) if text.strip() else None
    except RecursionError:
        raise bad_request(f"The request body is nested too deeply (the limit is {MAX_DEPTH} "
                          "levels).") from None
    except ValueError as exc:  # JSONDecodeError, and ints over Python's 4,300-digit limit
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if data is None:
        raise bad_request("The request body is empty: send a JSON object.")
    check_tree(data, check_strings=bool(_SURROGATE_ESCAPE.search(text)))
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_tree(data: Any, *, check_strings: bool) -> None:
    """Bounded nesting, and (when asked) no lone surrogate in any key or string."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"The request body is nested too deeply (the limit is {MAX_DEPTH}"
                              " levels).", path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if check_strings and not is_text(key):
                    raise _surrogate(shorten(where))
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif check_strings and isinstance(value, str) and not is_text(value):
            raise _surrogate(path)


def is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8 (lone surrogates can't)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(path: str) -> APIError:
    where = f"Field '{shorten(path)}'" if path else "The request body"
    return bad_request(f"{where} contains a lone UTF-16 surrogate (such as \\ud800), which is "
                       "not a character.", shorten(path) or None)


class Body:
    """Typed access to a JSON request body; every failure names the field."""

    def __init__(self, data: Any, prefix: str = "") -> None:
        if not isinstance(data, dict):
            where = f"'{prefix}'" if prefix else "The request body"
            raise bad_request(f"{where} must be a JSON object.", prefix or None)
        self.data = data
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise bad_request(f"Missing required field '{self._name(key)}'.", self._name(key))
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, but not in JSON
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_json_type(k) for k in kinds)
            raise bad_request(f"Field '{self._name(key)}' must be {names}.", self._name(key))
        return value

    def number(self, key: str, default: float | None = None, *, low: float | None = None,
               high: float | None = None) -> float | None:
        value = self.get(key, float, default)
        if value is None:
            return None
        try:
            value = float(value)
        except OverflowError:  # an integer literal too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise bad_request(f"Field '{self._name(key)}' must be a finite number.",
                              self._name(key))
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise bad_request(f"Field '{self._name(key)}' must be {span}.", self._name(key))
        return value

    def integer(self, key: str, default: int | None = None, *, low: int | None = None,
                high: int | None = None) -> int | None:
        """An integer within [low, high]; past int64 it is always an error (C code reads it)."""
        value = self.get(key, int, default)
        if value is None:
            return None
        low = -INT64 if low is None else low
        high = INT64 - 1 if high is None else high
        if not low <= value <= high:
            span = f"at least {low}" if value < low else f"at most {high}"
            raise bad_request(f"Field '{self._name(key)}' must be {span}.", self._name(key))
        return value

    def text(self, key: str, default: str | None = None, *, required: bool = False,
             max_chars: int | None = None, nonempty: bool = False) -> str | None:
        """A string field, optionally bounded and non-empty."""
        value = self.get(key, str, default, required=required)
        if value is None:
            return None
        if nonempty and not value:
            raise bad_request(f"Field '{self._name(key)}' must not be empty.", self._name(key))
        if max_chars is not None and len(value) > max_chars:
            raise bad_request(f"Field '{self._name(key)}' is too long (at most {max_chars} "
                              "characters).", self._name(key))
        return value


def _json_type(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "an object"}.get(kind, kind.__name__)
