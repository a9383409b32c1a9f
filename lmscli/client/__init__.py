"""The lmscli client: LM Studio's Python SDK surface over lmscli's HTTP server.

Imports httpx and the standard library only.
"""

from lmscli.client.client import Client
from lmscli.errors import (
    CancelledError,
    LMSError,
    ModelLoadError,
    ModelNotFoundError,
    PredictionError,
    ServerError,
    ServerNotRunningError,
    TimeoutError_,
)

__all__ = [
    "CancelledError", "Client", "LMSError", "ModelLoadError", "ModelNotFoundError",
    "PredictionError", "ServerError", "ServerNotRunningError", "TimeoutError_",
]
