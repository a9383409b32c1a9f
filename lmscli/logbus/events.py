"""The events of ``lms log stream`` (LM Studio's DiagnosticsLogEvent data) and their sources."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmscli.engine import Done, Event, Failed, Fragment
from lmscli.logbus.bus import LogBus

if TYPE_CHECKING:
    from lmscli.engine import Engine

# The names of the tool calls that were recovered from loosely written JSON in an output.
RecoveredCalls = Callable[[str], list[str]]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}


def prediction_input(identifier: str, model_path: str, prompt: str) -> dict[str, Any]:
    return {"type": "llm.prediction.input", "input": prompt, "modelPath": model_path,
            "modelIdentifier": identifier}


def prediction_output(identifier: str, output: str, stats: dict[str, Any] | None,
                      recovered: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "llm.prediction.output", "output": output,
                            "modelIdentifier": identifier}
    if stats is not None:
        data["stats"] = stats
    if recovered:
        # calls the model wrote as plain JSON, which the API returned as tool calls
        data["recoveredToolCalls"] = recovered
        if stats is not None:
            data["stats"] = {**stats, "recoveredToolCalls": len(recovered)}
    return data


def server_log(content: str, level: str = "info") -> dict[str, Any]:
    return {"type": "server.log", "content": content, "level": level}


def runtime_log(level: str, message: str, engine: Engine, identifier: str | None = None
                ) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "runtime.log", "level": level, "message": message,
                            "engineName": engine.name, "engineVersion": engine.version,
                            "engineType": "llm"}
    if identifier is not None:
        data["modelIdentifier"] = identifier
    data["pid"] = os.getpid()  # the engine runs inside the server process
    return data


class PredictionLog:
    """One prediction as the bus sees it: the prompt when it is submitted, the raw text and
    stats when the engine ends it. Exists only while somebody listens."""

    def __init__(self, bus: LogBus, identifier: str,
                 recovered_calls: RecoveredCalls | None = None) -> None:
        self._bus = bus
        self._identifier = identifier
        self._parts: list[str] = []
        self._recovered_calls = recovered_calls

    @classmethod
    def begin(cls, bus: LogBus | None, identifier: str, model_path: str, prompt: str,
              recovered_calls: RecoveredCalls | None = None) -> PredictionLog | None:
        if bus is None or not bus.active:
            return None
        bus.publish(prediction_input(identifier, model_path, prompt))
        return cls(bus, identifier, recovered_calls)

    def record(self, event: Event) -> None:
        """Called on the engine thread with every event, before the consumer sees it.

        Recording here rather than where the events are consumed logs the whole output even
        when the client stops reading early (the prediction then ends as userStopped)."""
        if isinstance(event, Fragment):
            self._parts.append(event.text)
        elif isinstance(event, Done | Failed):
            stats = event.stats.to_lms() if isinstance(event, Done) else None
            output = "".join(self._parts)
            recovered = self._recovered_calls(output) if self._recovered_calls else None
            self._bus.publish_threadsafe(
                prediction_output(self._identifier, output, stats, recovered))


class RuntimeLog:
    """The model manager's ``on_event``: to the Python log always, to the bus when someone
    listens."""

    def __init__(self, bus: LogBus, engine: Engine, logger: logging.Logger) -> None:
        self._bus = bus
        self._engine = engine
        self._logger = logger

    def __call__(self, level: str, message: str, identifier: str | None = None) -> None:
        self._logger.log(LEVELS.get(level, logging.INFO), message)
        if self._bus.active:
            self._bus.publish(runtime_log(level, message, self._engine, identifier))
