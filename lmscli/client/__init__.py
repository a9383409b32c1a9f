"""The lmscli client: LM Studio's Python SDK surface over lmscli's HTTP server.

Imports httpx and the standard library only. ``import lmscli as lms`` re-exports all of it.
Each name loads its module on first use, so that a command that needs only ``Chat`` or the
errors pays for neither httpx nor the client (whose model handles bring prediction and act()).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lmscli.errors import (
    CancelledError,
    LMSError,
    ModelLoadError,
    ModelNotFoundError,
    PredictionError,
    ServerError,
    ServerNotRunningError,
    ServerTimeoutError,
    UserInputError,
)

if TYPE_CHECKING:
    from lmscli.client.client import Client
    from lmscli.client.default import (
        configure_default_client,
        get_default_client,
        list_downloaded_models,
        list_loaded_models,
        llm,
    )
    from lmscli.client.handles import LLM, DownloadedModel
    from lmscli.client.history import AssistantResponse, Chat, Message, ToolResultMessage
    from lmscli.client.prediction import PredictionStream
    from lmscli.client.results import (
        ActResult,
        LlmInfo,
        LlmPredictionFragment,
        LlmPredictionStats,
        PredictionResult,
        PredictionRoundResult,
    )
    from lmscli.client.transport import get_sync_api_timeout, set_sync_api_timeout

_HOMES = {
    "client": ("Client",),
    "default": ("configure_default_client", "get_default_client", "list_downloaded_models",
                "list_loaded_models", "llm"),
    "handles": ("LLM", "DownloadedModel"),
    "history": ("AssistantResponse", "Chat", "Message", "ToolResultMessage"),
    "prediction": ("PredictionStream",),
    "results": ("ActResult", "LlmInfo", "LlmPredictionFragment", "LlmPredictionStats",
                "PredictionResult", "PredictionRoundResult"),
    "transport": ("get_sync_api_timeout", "set_sync_api_timeout"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lmscli.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmscli.client.{module}"), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


# LM Studio's SDK names for the same errors, so that ``except lms.LMStudioError`` works
LMStudioError = LMSError
LMStudioServerError = ServerError
LMStudioModelNotFoundError = ModelNotFoundError
LMStudioPredictionError = PredictionError
LMStudioClientError = ServerNotRunningError
LMStudioCancelledError = CancelledError
LMStudioTimeoutError = ServerTimeoutError
LMStudioValueError = UserInputError

__all__ = [
    "LLM", "ActResult", "AssistantResponse", "CancelledError", "Chat", "Client",
    "DownloadedModel", "LMSError", "LMStudioCancelledError", "LMStudioClientError",
    "LMStudioError", "LMStudioModelNotFoundError", "LMStudioPredictionError",
    "LMStudioServerError", "LMStudioTimeoutError", "LMStudioValueError", "LlmInfo",
    "LlmPredictionFragment", "LlmPredictionStats", "Message", "ModelLoadError",
    "ModelNotFoundError", "PredictionError", "PredictionResult", "PredictionRoundResult",
    "PredictionStream", "ServerError", "ServerNotRunningError", "ServerTimeoutError",
    "ToolResultMessage", "UserInputError", "configure_default_client", "get_default_client",
    "get_sync_api_timeout", "list_downloaded_models", "list_loaded_models", "llm",
    "set_sync_api_timeout",
]
