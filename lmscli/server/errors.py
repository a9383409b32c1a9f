"""Errors the server sends back with a 4xx/5xx status, and the body each API family's clients
parse them from (OpenAI's, Anthropic's, LM Studio's REST v1, Ollama's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# How much of a name the caller sent is echoed back in an error message.
ECHO_CHARS = 100


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# -- each API family's error body ----------------------------------------------------------

ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def openai_body(error: APIError) -> dict[str, Any]:
    return error.body()


def anthropic_body(error: APIError) -> dict[str, Any]:
    fallback = "api_error" if error.status >= 500 else "invalid_request_error"
    kind = ANTHROPIC_TYPES.get(error.status, fallback)
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def rest_v1_body(error: APIError) -> dict[str, Any]:
    """LM Studio's REST v1 body: ``type`` is one of v1's (invalid_request, model_not_found,
    job_not_found, not_implemented, mcp_connection_error, plugin_connection_error,
    internal_error)."""
    if error.code in ("model_not_found", "model_not_loaded", "job_not_found",
                      "not_implemented", "mcp_connection_error", "plugin_connection_error"):
        kind = "model_not_found" if error.code == "model_not_loaded" else error.code
    else:
        kind = "internal_error" if error.status >= 500 else "invalid_request"
    return {"error": {"type": kind, "message": error.message, "code": error.code,
                      "param": error.param}}


@dataclass(frozen=True)
class Surface:
    """An API family, as its clients parse errors: each route in ``app.py`` names its own,
    and every error on it (from the handler, the router or the guard) takes that shape."""

    name: str
    error_body: Callable[[APIError], dict[str, Any]]


def ollama_body(error: APIError) -> dict[str, Any]:
    """Ollama's body: one string; its clients raise it as their ResponseError."""
    return {"error": error.message}


OPENAI = Surface("openai", openai_body)  # also /api/v0 and lmscli's own routes
ANTHROPIC = Surface("anthropic", anthropic_body)
REST_V1 = Surface("rest_v1", rest_v1_body)
OLLAMA = Surface("ollama", ollama_body)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` as it may be echoed in a message: bounded, lone surrogates replaced."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


def model_not_found(name: str, available: list[str]) -> APIError:
    listing = ", ".join(available) if available else "none (download one with: lms get)"
    return APIError(404, f'Model "{shorten(name)}" not found. Available models: {listing}',
                    param="model", code="model_not_found")
