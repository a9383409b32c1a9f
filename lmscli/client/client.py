"""A synchronous client for the lmscli server (httpx and the standard library only)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from lmscli import serverstate
from lmscli.errors import (
    LMSError,
    ModelLoadError,
    ModelNotFoundError,
    ServerError,
    ServerNotRunningError,
    TimeoutError_,
    UserInputError,
)

if TYPE_CHECKING:
    from lmscli.client.handles import LLM, DownloadedModel

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


def error_from_response(response: httpx.Response) -> LMSError:
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


class Client:
    """Talks to one server. Without ``api_host`` it finds the running lmscli server."""

    def __init__(self, api_host: str | None = None, *, timeout: float | None = None) -> None:
        if api_host:
            self.host, self.port = parse_api_host(api_host)
        else:
            state = serverstate.read_state()
            if state is None:
                raise ServerNotRunningError()
            self.host, self.port = state.client_host, state.port
        self.base_url = f"http://{self.host}:{self.port}"
        read = timeout if timeout is not None else get_sync_api_timeout()
        self._http = httpx.Client(base_url=self.base_url,
                                  timeout=httpx.Timeout(read, connect=5.0))
        from lmscli.client.handles import LlmNamespace

        self.llm = LlmNamespace(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """httpx's connection failures as lmscli errors that say what to do."""
        try:
            yield
        except httpx.ConnectError as exc:
            raise ServerNotRunningError(
                f"The server is not running at {self.host}:{self.port}.") from exc
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"The server at {self.host}:{self.port} did not answer in "
                                "time.") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._transport_errors():
            response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json()

    def open_stream(self, path: str, body: dict[str, Any]) -> tuple[Any, httpx.Response]:
        """POST and return (context, response) once the status is known to be good."""
        context = self._http.stream("POST", path, json=body)
        with self._transport_errors():
            response = context.__enter__()
        if response.status_code >= 400:
            response.read()
            context.__exit__(None, None, None)
            raise error_from_response(response)
        return context, response

    def _ndjson(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        context, response = self.open_stream(path, body)
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)
        except httpx.RemoteProtocolError as exc:
            raise ServerError(f"The server closed the connection: {exc}") from exc
        finally:
            context.__exit__(None, None, None)

    # -- server ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/lmscli/status")

    def shutdown(self) -> None:
        self._request("POST", "/lmscli/shutdown")

    # -- models ----------------------------------------------------------------------------

    def downloaded_models_info(self) -> list[dict[str, Any]]:
        """LM Studio ModelInfo dicts of the models on disk."""
        return self._request("GET", "/lmscli/models/downloaded")

    def loaded_models_info(self) -> list[dict[str, Any]]:
        """Instance info dicts (with status and queue) of the loaded models."""
        return self._request("GET", "/lmscli/models/loaded")

    def list_downloaded_models(self, namespace: str | None = None) -> list[DownloadedModel]:
        from lmscli.client.handles import DownloadedModel

        return [DownloadedModel(self, i) for i in self.downloaded_models_info()
                if namespace in (None, i["type"])]

    def list_loaded_models(self, namespace: str | None = None) -> list[LLM]:
        from lmscli.client.handles import LLM

        return [LLM(self, i["identifier"]) for i in self.loaded_models_info()
                if namespace in (None, i.get("type", "llm"))]

    def cancel_prediction(self, prediction_id: str) -> None:
        try:
            self._request("POST", f"/lmscli/predict/{prediction_id}/cancel")
        except ServerError as exc:
            if exc.status != 404:  # already finished: nothing to cancel
                raise

    def load(self, model_key: str, *, identifier: str | None = None,
             context_length: int | None = None, gpu: float | str | None = None,
             ttl: int | None = None, get_or_load: bool = False,
             on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Load a new instance (or, with ``get_or_load``, reuse a loaded one); returns its
        info, with ``loadTimeSec``."""
        body = {k: v for k, v in {"model": model_key, "identifier": identifier,
                                  "context_length": context_length, "gpu": gpu,
                                  "ttl": ttl, "get_or_load": get_or_load or None}.items()
                if v is not None}
        for event in self._ndjson("/lmscli/models/load", body):
            if event["type"] == "progress" and on_progress:
                on_progress(float(event["progress"]))
            elif event["type"] == "success":
                return event["info"] | {"loadTimeSec": event.get("loadTimeSec")}
            elif event["type"] == "error":
                err = event["error"]
                raise error_from_body(err["message"], event.get("status", 500),
                                      err.get("code"), err.get("param"))
        raise ServerError(f"The server ended the load of {model_key} without a result.")

    def unload(self, identifier: str) -> None:
        self._request("POST", "/lmscli/models/unload", json={"identifier": identifier})

    def unload_all(self) -> list[str]:
        return self._request("POST", "/lmscli/models/unload", json={"all": True})["unloaded"]
