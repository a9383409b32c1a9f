"""The one error hierarchy of lmscli.

Every error a user can cause or fix derives from ``LMSError``; the CLI turns them into a
one-line message and ``exit_code`` in one place (``lmscli.cli.app.main``). Anything else is a
bug and keeps its traceback. Standard library only: the client re-exports these.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit status of ``lms`` and of the server process."""

    OK = 0
    ERROR = 1  # also every usage error, as lms (commander) does
    PORT_IN_USE = 3
    BIND_FAILED = 4
    UNSAFE_BIND = 5  # a network bind without an API key
    INTERRUPTED = 130  # Ctrl+C, as a shell reports SIGINT


class LMSError(Exception):
    """Base of every expected error. ``hint`` is an extra line telling the user what to do."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UserInputError(LMSError):
    """Bad flags or arguments."""


class ModelNotFoundError(LMSError):
    """A model key, path or identifier that matches nothing."""

    def __init__(self, message: str, *, available: list[str] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.available = available or []


class InvalidModelFileError(LMSError):
    """A file that is not a usable GGUF model (wrong magic, truncated, unsupported)."""


class DownloadError(LMSError):
    """A model could not be fetched."""


class ServerNotRunningError(LMSError):
    """No lmscli server answers where we looked."""

    def __init__(self, message: str = "The server is not running.", *,
                 hint: str | None = "Start it with: lms server start") -> None:
        super().__init__(message, hint=hint)


class ServerError(LMSError):
    """The server answered with an error; ``status`` is the HTTP status."""

    def __init__(self, message: str, *, status: int = 500, code: str | None = None,
                 param: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code
        self.param = param


class ConnectionLostError(ServerError):
    """The connection to the server broke in the middle of an answer."""


class ModelLoadError(ServerError):
    """The server could not load a model (corrupt file, out of memory...)."""


class PredictionError(ServerError):
    """A prediction failed on the server."""


class CancelledError(LMSError):
    """An operation stopped by the user."""

    exit_code = ExitCode.INTERRUPTED


class ServerTimeoutError(LMSError):
    """No answer from the server in time."""
