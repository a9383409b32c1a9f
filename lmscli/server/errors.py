"""Errors the server sends back, always in the OpenAI body shape with a 4xx/5xx status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, available: list[str]) -> APIError:
    listing = ", ".join(available) if available else "none (download one with: lms get)"
    return APIError(404, f'Model "{name}" not found. Available models: {listing}',
                    param="model", code="model_not_found")


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
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise bad_request(f"Field '{self._name(key)}' must be {span}.", self._name(key))
        return float(value)

    def integer(self, key: str, default: int | None = None, *, low: int | None = None
                ) -> int | None:
        value = self.get(key, int, default)
        if value is not None and low is not None and value < low:
            raise bad_request(f"Field '{self._name(key)}' must be at least {low}.",
                              self._name(key))
        return value


def _json_type(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "an object"}.get(kind, kind.__name__)
