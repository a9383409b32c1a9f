"""A loaded model with its own worker thread and request queue.

Every call into the backend library happens on the worker thread; the rest of the program
talks to an instance through ``submit`` (a prediction request plus a sink for its events) and
reads ``status`` / ``queued``. Nothing outside the engine may assume predictions run one at a
time: a batching backend may interleave them; this one runs them in order.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmscli.engine.types import (
    Done,
    Event,
    Failed,
    LoadOptions,
    PredictionRequest,
    PredictionStats,
    Status,
)

Sink = Callable[[Event], None]
ProgressFn = Callable[[float], bool | None]


@dataclass
class ModelSpec:
    """What the engine needs to know about a model file."""

    path: str
    model_key: str
    architecture: str | None = None
    max_context_length: int | None = None
    chat_template: str | None = None
    is_embedding: bool = False


class Prediction:
    """Handle on a submitted request: cancel it, or wait for it to finish."""

    _ids = itertools.count(1)

    def __init__(self, request: PredictionRequest, sink: Sink) -> None:
        self.id = next(self._ids)
        self.request = request
        self._sink = sink
        self._cancel = threading.Event()
        self.finished = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        finally:
            if isinstance(event, Done | Failed):
                self.finished.set()


@dataclass
class _Job:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ModelInstance:
    """Base for engine instances: owns the worker thread, the queue and the status."""

    engine_name = "base"

    def __init__(self, spec: ModelSpec, options: LoadOptions) -> None:
        self.spec = spec
        self.options = options
        self.context_length = options.context_length or spec.max_context_length or 4096
        self.status: Status = "loading"
        self._queue: queue.Queue[Prediction | _Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"engine-{spec.model_key}", daemon=True
        )
        self._closed = False
        self._current: Prediction | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, on_progress: ProgressFn | None = None) -> None:
        """Load on the worker thread and block until loaded; raises what loading raised."""
        self._thread.start()
        self.call(lambda: self._load(on_progress))
        self.status = "idle"

    def close(self) -> None:
        """Cancel what runs, drop what waits, free the model. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._current is not None:
            self._current.cancel()
        self._drain_queue()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Requests waiting behind the one that runs."""
        with self._lock:
            return max(0, self._pending - (1 if self._current else 0))

    # -- work ------------------------------------------------------------------------------

    def submit(self, request: PredictionRequest, sink: Sink) -> Prediction:
        prediction = Prediction(request, sink)
        if self._closed:
            prediction.emit(Done(PredictionStats(stop_reason="modelUnloaded")))
            return prediction
        with self._lock:
            self._pending += 1
        self._queue.put(prediction)
        return prediction

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread (after what is queued) and return its result."""
        job = _Job(fn)
        with self._lock:
            self._pending += 1
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._safe_unload()
                return
            try:
                if isinstance(item, Prediction):
                    self._run_prediction(item)
                else:
                    self._run_job(item)
            finally:
                with self._lock:
                    self._pending -= 1

    def _run_job(self, job: _Job) -> None:
        try:
            job.result = job.fn()
        except BaseException as exc:  # handed back to the caller's thread
            job.error = exc
        finally:
            job.done.set()

    def _run_prediction(self, prediction: Prediction) -> None:
        if prediction.cancelled or self._closed:
            reason = "modelUnloaded" if self._closed else "userStopped"
            prediction.emit(Done(PredictionStats(stop_reason=reason)))
            return
        self._current = prediction
        try:
            self._predict(prediction)
        except Exception as exc:  # a failed prediction must not kill the worker
            prediction.emit(Failed(f"{type(exc).__name__}: {exc}"))
        finally:
            self._current = None
            self.status = "idle"
            if not prediction.finished.is_set():
                prediction.emit(Failed("The engine ended the prediction without a result."))

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Prediction):
                item.emit(Done(PredictionStats(stop_reason="modelUnloaded")))
            elif isinstance(item, _Job):
                item.error = RuntimeError("The model was unloaded.")
                item.done.set()
            with self._lock:
                self._pending -= 1

    def _safe_unload(self) -> None:
        # a failure while freeing must never hang the caller waiting in close()
        with contextlib.suppress(Exception):
            self._unload()

    # -- backend hooks ---------------------------------------------------------------------

    def _load(self, on_progress: ProgressFn | None) -> None:
        raise NotImplementedError

    def _predict(self, prediction: Prediction) -> None:
        raise NotImplementedError

    def _unload(self) -> None:
        pass

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError

    @property
    def bos_token(self) -> str:
        return ""

    @property
    def eos_token(self) -> str:
        return ""


class Engine:
    """Creates instances. The server holds one engine; tests register a fake one."""

    name = "base"
    version = "0"

    def create(self, spec: ModelSpec, options: LoadOptions) -> ModelInstance:
        raise NotImplementedError

    def load(self, spec: ModelSpec, options: LoadOptions,
             on_progress: ProgressFn | None = None) -> ModelInstance:
        instance = self.create(spec, options)
        try:
            instance.start(on_progress)
        except BaseException:
            instance.close()
            raise
        return instance
