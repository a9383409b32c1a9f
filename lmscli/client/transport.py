"""The bottom of the client: HTTP to one server, and the one mapping of httpx's failures and
the server's error bodies to lmscli errors. Everything else in the client imports from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from lmscli import serverstate
from lmscli.errors import (
    ConnectionLostError,
    LMSError,
    ModelLoadError,
    ModelNotFoundError,
    ServerError,
    ServerNotRunningError,
    ServerTimeoutError,
    UserInputError,
)

DEFAULT_TIMEOUT = 60.0  # seconds without a message from the server, as LM Studio's SDK
_timeout = {"seconds": DEFAULT_TIMEOUT}


def set_sync_api_timeout(seconds: float | None) -> None:
    """How long a call waits for the next message from the server (None: forever)."""
    _timeout["seconds"] = seconds  # type: ignore[assignment]


def get_sync_api_timeout() -> float | None:
    return _timeout["seconds"]


def parse_api_host(api_host: str) -> tuple[str, int]:
    """``host:port`` (no scheme), as LM Studio's SDK takes it."""
    if "://" in api_host:
        raise UserInputError(f"api_host must be host:port without a scheme, not {api_host!r}.")
    host, sep, port = api_host.rpartition(":")
    if not sep or not port.isdigit():
        return api_host, serverstate.DEFAULT_PORT
    return host or "127.0.0.1", int(port)


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """The header that carries the API key: ``api_key``, else LMS_API_KEY or LM_API_TOKEN."""
    key = api_key or serverstate.env_api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


# -- errors ----------------------------------------------------------------------------------

@contextmanager
def transport_errors(where: str) -> Iterator[None]:
    """httpx's failures as lmscli errors that say what to do; ``where`` is ``host:port``."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ServerNotRunningError(f"The server is not running at {where}.") from exc
    except httpx.TimeoutException as exc:
        raise ServerTimeoutError(f"No answer from the server at {where} in time (see "
                                 "lms.set_sync_api_timeout).") from exc
    except httpx.HTTPError as exc:
        raise ConnectionLostError(f"The connection to the server broke: {exc}") from exc


def error_from_response(response: httpx.Response) -> LMSError:
    if response.status_code == 401:
        return _auth_error(response)
    try:
        err = response.json()["error"]
        message, code, param = err["message"], err.get("code"), err.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = response.text.strip() or response.reason_phrase, None, None
    return error_from_body(message, response.status_code, code, param)


def error_from_body(message: str, status: int, code: str | None, param: str | None
                    ) -> LMSError:
    if code in ("model_not_found", "model_not_loaded"):
        return ModelNotFoundError(message)
    if code == "model_load_failed":
        return ModelLoadError(message, status=status, code=code, param=param)
    return ServerError(message, status=status, code=code, param=param)


def _auth_error(response: httpx.Response) -> LMSError:
    """A 401 as one line that says what to do (the server's text names HTTP headers)."""
    if "authorization" in response.request.headers:
        message = ("The server rejected the API key: set LMS_API_KEY to the key the server "
                   "was started with.")
    else:
        message = "The server needs an API key: set LMS_API_KEY."
    return ServerError(message, status=401, code="invalid_api_key")


# -- the connection --------------------------------------------------------------------------

class Stream:
    """An open streamed response whose status was good; iterate its non-empty lines."""

    def __init__(self, context: Any, response: httpx.Response, where: str) -> None:
        self._context = context
        self.response = response
        self._where = where
        self._lines = response.iter_lines()

    def lines(self) -> Iterator[str]:
        with transport_errors(self._where):
            for line in self._lines:
                if line.strip():
                    yield line

    def json_lines(self) -> Iterator[dict[str, Any]]:
        for line in self.lines():
            yield json.loads(line)

    def close(self) -> None:
        self._context.__exit__(None, None, None)


class Transport:
    """One server: JSON requests and streamed responses, errors already mapped."""

    def __init__(self, host: str, port: int, *, api_key: str | None = None,
                 timeout: float | None = None) -> None:
        self.host, self.port = host, port
        self.where = f"{host}:{port}"
        self.base_url = f"http://{self.where}"
        read = timeout if timeout is not None else get_sync_api_timeout()
        # verify=False: the server speaks plain HTTP, so no TLS context (and no CA bundle to
        # load, a noticeable part of a command's start) is needed
        self._http = httpx.Client(base_url=self.base_url, headers=auth_headers(api_key),
                                  timeout=httpx.Timeout(read, connect=5.0), verify=False)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with transport_errors(self.where):
            response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        # every POST is JSON, even without a body: the server refuses others (CSRF)
        return self.request("POST", path, json=body)

    def stream(self, path: str, body: dict[str, Any]) -> Stream:
        """POST and return the open stream once its status is known to be good."""
        context = self._http.stream("POST", path, json=body)
        with transport_errors(self.where):
            response = context.__enter__()
        if response.status_code >= 400:
            response.read()
            context.__exit__(None, None, None)
            raise error_from_response(response)
        return Stream(context, response, self.where)

    def ndjson(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        stream = self.stream(path, body)
        try:
            yield from stream.json_lines()
        finally:
            stream.close()
