"""``PredictionStream``: one streamed prediction, its callbacks and its final result."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lmscli.client.history import AssistantResponse
from lmscli.client.results import (
    LlmInfo,
    LlmPredictionFragment,
    LlmPredictionStats,
    PredictionResult,
)
from lmscli.client.transport import Transport
from lmscli.errors import CancelledError, LMSError, PredictionError, ServerError

log = logging.getLogger("lmscli.client")


@dataclass
class Callbacks:
    on_message: Callable[..., Any] | None = None
    on_first_token: Callable[..., Any] | None = None
    on_prediction_fragment: Callable[..., Any] | None = None
    on_prompt_processing_progress: Callable[..., Any] | None = None
    round_index: int | None = None  # act() passes the round to every callback but on_message

    def call(self, name: str, *args: Any, with_round: bool = True) -> None:
        if with_round and self.round_index is not None:
            args = (*args, self.round_index)
        safe_call(name, getattr(self, name), *args)


def safe_call(name: str, fn: Callable[..., Any] | None, *args: Any) -> None:
    """Run a user's callback; an exception in it is logged, never raised (as the SDK)."""
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("Exception in %s callback (ignored)", name)


class PredictionStream:
    """Iterate for fragments; ``result()`` once finished; ``cancel()`` to stop early.

    The request is sent when the stream is created, so errors such as an unknown model raise
    right away. Usable as a context manager; leaving it closes the connection, which stops
    the prediction on the server.
    """

    def __init__(self, transport: Transport, body: dict[str, Any], *,
                 structured: bool = False, callbacks: Callbacks | None = None) -> None:
        self._transport = transport
        self._structured = structured
        self._cb = callbacks or Callbacks()
        self._result: PredictionResult | None = None
        self._closed = False
        self._cancel_requested = False
        self._last_progress: float | None = None
        self._saw_fragment = False
        self._content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self._stream = transport.stream("/lmscli/predict", body)
        self._lines = self._stream.json_lines()
        started = self._next_event()
        if started is None or started.get("type") != "started":
            self.close()
            raise ServerError("The server did not start the prediction.")
        self.prediction_id: str = started["predictionId"]
        self._events = self._run()

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[LlmPredictionFragment]:
        return self._events

    def _next_event(self) -> dict[str, Any] | None:
        return next(self._lines, None)

    def _run(self) -> Iterator[LlmPredictionFragment]:
        try:
            while (event := self._next_event()) is not None:
                kind = event["type"]
                if kind == "promptProcessingProgress":
                    self._progress(float(event["progress"]))
                elif kind == "fragment":
                    fragment = LlmPredictionFragment.from_wire(event["fragment"])
                    if self._cancel_requested:
                        continue  # what arrives after cancel() is dropped, as in the SDK
                    self._on_fragment(fragment)
                    yield fragment
                elif kind == "toolCallGenerationEnd":
                    self.tool_calls.append(event["toolCallRequest"])
                elif kind == "success":
                    self._finish(event)
                    return
                elif kind == "error":
                    raise PredictionError(event["error"]["message"])
            raise ServerError("The server ended the prediction without a result.")
        finally:
            self.close()

    def _progress(self, value: float) -> None:
        if self._saw_fragment:
            return
        if self._last_progress is None and value > 0.0:
            self._last_progress = 0.0
            self._cb.call("on_prompt_processing_progress", 0.0)
        if self._last_progress is None or value > self._last_progress:
            self._last_progress = value
            self._cb.call("on_prompt_processing_progress", value)

    def _on_fragment(self, fragment: LlmPredictionFragment) -> None:
        if not self._saw_fragment:
            self._progress(1.0)
            self._saw_fragment = True
            self._cb.call("on_first_token")
        self._content.append(fragment.content)
        self._cb.call("on_prediction_fragment", fragment)

    def _finish(self, event: dict[str, Any]) -> None:
        content = "".join(self._content)
        parsed: Any = content
        if self._structured:
            try:
                parsed = json.loads(content)
            except ValueError:
                parsed = content
        self._result = PredictionResult(
            content=content, parsed=parsed, structured=self._structured,
            stats=LlmPredictionStats.from_wire(event["stats"]),
            model_info=LlmInfo.from_wire(event["modelInfo"]))
        self._cb.call("on_message", AssistantResponse(content), with_round=False)

    # -- control --------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop between tokens; the stream still ends with a result (stop reason userStopped)."""
        if self._result is not None or self._closed:
            return
        self._cancel_requested = True
        try:
            self._transport.post(f"/lmscli/predict/{self.prediction_id}/cancel", {})
        except ServerError as exc:
            if exc.status != 404:  # already finished: nothing to cancel
                raise

    def wait_for_result(self) -> PredictionResult:
        for _ in self._events:
            pass
        return self.result()

    def result(self) -> PredictionResult:
        if self._result is not None:
            return self._result
        if self._closed:
            raise CancelledError("Prediction cancelled unexpectedly: please use .cancel()")
        raise LMSError("The prediction has not finished yet: iterate over the stream or call "
                       "wait_for_result().")

    @property
    def stats(self) -> LlmPredictionStats | None:
        return self._result.stats if self._result else None

    @property
    def model_info(self) -> LlmInfo | None:
        return self._result.model_info if self._result else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.close()

    def __enter__(self) -> PredictionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
