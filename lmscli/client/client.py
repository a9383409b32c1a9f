"""A synchronous client for the lmscli server (httpx and the standard library only).

``Client`` sits above the model handles it returns: handles.py knows it only as the
``ModelServer`` protocol, so that neither module has to hide an import of the other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lmscli import serverstate
from lmscli.client.handles import LLM, DownloadedModel, LlmNamespace
from lmscli.client.transport import Transport, error_from_body, parse_api_host
from lmscli.errors import ServerError, ServerNotRunningError


class Client:
    """Talks to one server. Without ``api_host`` it finds the running lmscli server. The API
    key is ``api_key``, else LMS_API_KEY (or LM_API_TOKEN); the server may need none."""

    def __init__(self, api_host: str | None = None, *, timeout: float | None = None,
                 api_key: str | None = None) -> None:
        if api_host:
            host, port = parse_api_host(api_host)
        else:
            state = serverstate.read_state()
            if state is None:
                raise ServerNotRunningError()
            host, port = state.client_host, state.port
        self.transport = Transport(host, port, api_key=api_key, timeout=timeout)
        self.host, self.port, self.base_url = host, port, self.transport.base_url

    @functools.cached_property
    def llm(self) -> LlmNamespace:
        return LlmNamespace(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    # -- server ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.transport.request("GET", "/lmscli/status")

    def shutdown(self) -> None:
        self.transport.post("/lmscli/shutdown", {})

    # -- models ----------------------------------------------------------------------------

    def downloaded_models_info(self) -> list[dict[str, Any]]:
        """LM Studio ModelInfo dicts of the models on disk."""
        return self.transport.request("GET", "/lmscli/models/downloaded")

    def loaded_models_info(self) -> list[dict[str, Any]]:
        """Instance info dicts (with status and queue) of the loaded models."""
        return self.transport.request("GET", "/lmscli/models/loaded")

    def list_downloaded_models(self, namespace: str | None = None) -> list[DownloadedModel]:
        return [DownloadedModel(self, i) for i in self.downloaded_models_info()
                if namespace in (None, i["type"])]

    def list_loaded_models(self, namespace: str | None = None) -> list[LLM]:
        return [LLM(self, i["identifier"]) for i in self.loaded_models_info()
                if namespace in (None, i.get("type", "llm"))]

    def load(self, model_key: str, *, identifier: str | None = None,
             context_length: int | None = None, gpu: float | str | None = None,
             ttl: int | None = None, get_or_load: bool = False, parallel: int | None = None,
             speculative: str | None = None, draft_model: str | None = None,
             draft_max_tokens: int | None = None, draft_min_tokens: int | None = None,
             on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Load a new instance (or, with ``get_or_load``, reuse a loaded one); returns its
        info, with ``loadTimeSec``. ``draft_model`` drafts for it (a model key);
        ``draft_max_tokens`` / ``draft_min_tokens`` bound a draft's length."""
        body = {k: v for k, v in {"model": model_key, "identifier": identifier,
                                  "context_length": context_length, "gpu": gpu,
                                  "ttl": ttl, "parallel": parallel, "speculative": speculative,
                                  "draft_model": draft_model,
                                  "draft_max_tokens": draft_max_tokens,
                                  "draft_min_tokens": draft_min_tokens,
                                  "get_or_load": get_or_load or None}.items()
                if v is not None}
        for event in self.transport.ndjson("/lmscli/models/load", body):
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
        self.transport.post("/lmscli/models/unload", {"identifier": identifier})

    def unload_all(self) -> list[str]:
        return self.transport.post("/lmscli/models/unload", {"all": True})["unloaded"]
