"""The default client and the convenience API: ``lms.llm()``, ``lms.list_loaded_models()``.

The top of the client package: it may import everything below it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from lmscli.client.client import Client
from lmscli.client.handles import LLM, DownloadedModel
from lmscli.errors import UserInputError

_default: dict[str, Any] = {"client": None, "api_host": None}
_default_lock = threading.Lock()


def configure_default_client(api_host: str) -> None:
    with _default_lock:
        if _default["client"] is not None:
            raise UserInputError("Default client is already created, cannot set its API host.")
        _default["api_host"] = api_host


def get_default_client(api_host: str | None = None) -> Client:
    with _default_lock:
        if _default["client"] is None:
            _default["client"] = Client(api_host or _default["api_host"])
        return _default["client"]


def llm(model_key: str | None = None, /, *, ttl: int | None = 3600,
        config: Mapping[str, Any] | None = None) -> LLM:
    return get_default_client().llm.model(model_key, ttl=ttl, config=config)


def list_loaded_models(namespace: str | None = None) -> list[LLM]:
    return get_default_client().list_loaded_models(namespace)


def list_downloaded_models(namespace: str | None = None) -> list[DownloadedModel]:
    return get_default_client().list_downloaded_models(namespace)



def reset_default_client() -> None:
    """Close and forget the default client, so that the next call finds the server afresh."""
    with _default_lock:
        if _default["client"] is not None:
            _default["client"].close()
        _default.update(client=None, api_host=None)
