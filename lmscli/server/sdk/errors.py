"""Errors in the SDK protocol's shape: ``SerializedLMSExtendedError``.

The official client turns ``{"title", "displayData": {"code"}}`` into its own exception
classes (``generic.noModelMatchingQuery`` → ``LMStudioModelNotFoundError``, …) and prints the
title, so the title carries lmscli's message unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from lmscli.server.errors import APIError

log = logging.getLogger("lmscli.server.sdk")

NO_MODEL = "generic.noModelMatchingQuery"
DOMAIN_MISMATCH = "generic.domainMismatch"
PRESET_NOT_FOUND = "generic.presetNotFound"
# lmscli's error codes that LM Studio reports with a display code of its own
DISPLAY_CODES = {
    "model_not_found": NO_MODEL,
    "model_not_loaded": NO_MODEL,
}


class SdkError(Exception):
    """An error to report to an SDK client; ``code`` is LM Studio's displayData code."""

    def __init__(self, title: str, *, code: str | None = None,
                 suggestion: str | None = None) -> None:
        super().__init__(title)
        self.title = title
        self.code = code
        self.suggestion = suggestion

    def serialized(self) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title}
        if self.code:
            out["displayData"] = {"code": self.code}
        if self.suggestion:
            out["suggestion"] = self.suggestion
        return out


def serialize(exc: BaseException) -> dict[str, Any]:
    """Any exception as a SerializedLMSExtendedError; the unexpected ones are logged."""
    if isinstance(exc, SdkError):
        return exc.serialized()
    if isinstance(exc, APIError):
        if exc.status >= 500:
            log.error("SDK request failed: %s", exc.message)
        code = DISPLAY_CODES.get(exc.code or "")
        return SdkError(exc.message, code=code).serialized()
    log.error("SDK request failed", exc_info=exc)
    return {"title": f"Internal server error: {type(exc).__name__}: {exc}"}
