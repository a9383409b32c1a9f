"""A loaded model: one thread that owns it and decodes several predictions together.

Every call into the backend happens on the instance's own thread; the rest of the program
talks to an instance through ``submit`` (a prediction request plus a sink for its events) and
reads ``status`` / ``queued``. The thread runs a step loop (the same order as llama-server's):
take new requests and cancellations, admit waiting requests to free slots, build one batch
(one token per generating slot, then prompt chunks), decode once, sample each slot, emit.

What it asks of llama.cpp goes through a ``backend.Backend`` (decode, sample, tokenize, the
KV cache's edits and saved states); the scheduling (slots, prefix reuse, queueing, drafting,
stop checks, stats) is written once, here, and so the fake engine exercises the same code as
llama.cpp.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmscli.engine.backend import (
    Backend,
    DraftModelError,
    GrammarError,
    ModelSpec,
    PredictionFailure,
    ProgressFn,
)
from lmscli.engine.promptcache import Hit, PromptCache
from lmscli.engine.slots import Batch, Choice, Sequence, Slot, choose_slot
from lmscli.engine.speculation import Speculation
from lmscli.engine.types import (
    QUEUE_FULL,
    Done,
    DraftModel,
    Event,
    Failed,
    LoadOptions,
    PredictionRequest,
    PredictionStats,
    PromptProgress,
    QueueFull,
    Status,
    StopReason,
)

Sink = Callable[[Event], None]
__all__ = ["Backend", "DraftModelError", "Engine", "GrammarError", "ModelInstance", "ModelSpec",
           "Prediction", "PredictionFailure", "ProgressFn"]

# Prompt tokens per step when no other slot generates: small enough that progress moves.
PROMPT_CHUNK = 256
# Prompt tokens per step while others generate: each prompt token costs about 4 ms on a
# 2-core CPU, so this keeps their streams moving (llama-server fills the whole batch).
PROMPT_SHARE = 64
NO_ROOM = 1  # llama_decode: no KV cells for the batch (nothing was changed)
# The prompt cache: a slot's cache is saved when at least MIN_SAVE tokens would be lost, and
# a saved state restored when it spares at least MIN_RESTORE tokens of decoding and one in
# RESTORE_SHARE of the state's tokens. Restoring copies the whole state: on the default model
# (2 cores) about 2.4 µs a token against about 3 ms to decode one (bench/prompt_cache.py
# break-even), so the share leaves room for engines whose decode is 30x faster (a GPU).
MIN_SAVE = 32
MIN_RESTORE = 8
RESTORE_SHARE = 32
PERSIST_S = 10.0  # at unload, the longest wait for saved states to reach the disk
# Embeddings share the step loop: one input per step while predictions run, so that a
# request with thousands of inputs never stalls a chat; alone, inputs for up to this long.
EMBED_ALONE_S = 0.1

log = logging.getLogger("lmscli.engine")


class Prediction:
    """Handle on a submitted request: cancel it, or wait for it to finish."""

    _ids = itertools.count(1)

    def __init__(self, request: PredictionRequest, sink: Sink) -> None:
        self.id = next(self._ids)
        self.request = request
        self.submitted_at = time.perf_counter()
        self.tokens: list[int] | None = None  # the tokenized prompt, once the engine has it
        self._sink = sink
        self._cancel = threading.Event()
        self.finished = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, event: Event) -> None:
        if self.finished.is_set():
            return
        try:
            self._sink(event)
        finally:
            if isinstance(event, Done | Failed):
                self.finished.set()

    def end(self, reason: StopReason, prompt_tokens: int = 0) -> None:
        elapsed = time.perf_counter() - self.submitted_at
        self.emit(Done(PredictionStats(stop_reason=reason, prompt_tokens=prompt_tokens,
                                       total_time_s=elapsed)))


class Embedding:
    """Handle on submitted embeddings: wait for the vectors, or cancel them."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.vectors: list[list[float]] = []
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def result(self) -> list[list[float]]:
        """The vectors, in order, once all are made; raises why they could not be."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.vectors


@dataclass
class _Job:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ModelInstance:
    """A loaded model: the thread, the slots, the queue and the step loop, over a backend."""

    def __init__(self, spec: ModelSpec, options: LoadOptions, backend: Backend) -> None:
        self.spec = spec
        self.backend = backend
        self.options = options
        self.context_length = options.context_length or spec.max_context_length or 4096
        self.parallel = max(1, options.parallel)
        self.max_queue = max(0, options.max_queue)
        self.status: Status = "loading"
        self.slots = [Slot(i) for i in range(self.parallel)]
        self._inbox: queue.Queue[Prediction | Embedding | _Job | None] = queue.Queue()
        self._waiting: deque[Prediction] = deque()
        self._embeddings: deque[Embedding] = deque()  # taken in turn, one input at a time
        self._embeddings_pending = 0  # submitted, not yet ended
        # while predictions run, embeddings get the time the steps took, no more: half the
        # loop at most, so that answers keep streaming
        self._embed_credit = 0.0
        self._running: list[Sequence] = []
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet given a slot
        self._busy = 0  # holding a slot
        # the first waiting request does not fit the KV pool beside those running: until one
        # ends, a free slot takes nobody
        self._short_of_room = False
        self._thread = threading.Thread(
            target=self._run, name=f"engine-{spec.model_key}", daemon=True
        )
        self._closed = False
        self._stopping = False
        self.cache: PromptCache | None = None  # shared by the server's instances
        self.cache_key = ""  # the states this instance may restore: set once loaded
        self.speculation = Speculation(backend, options)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, on_progress: ProgressFn | None = None) -> None:
        """Load on the worker thread and block until loaded; raises what loading raised."""
        self._thread.start()
        self.call(lambda: self._load(on_progress))
        if self.options.draft_model is not None:
            self.call(lambda: self._use_draft(self.options.draft_model))
        self.cache_key = self._cache_key()
        self.status = "idle"

    def _cache_key(self) -> str:
        """What a saved state depends on: the engine, the model file and the load options
        that shape the KV cache."""
        try:
            st = os.stat(self.spec.path)
            file = f"{os.path.realpath(self.spec.path)}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            file = self.spec.path
        shape = (f"ctx={self.context_length} seq={self.parallel} kv={self.backend.kv_type} "
                 f"gpu={self.options.gpu_ratio}")
        return f"{self.engine_name} {self.engine_version} | {file} | {shape}"
    def close(self) -> None:
        """End what runs, drop what waits, free the model. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot: submitted, and not about to be taken by a free one
        (those are in a slot at the next step). At most ``max_queue``."""
        with self._lock:
            return max(0, self._waiting_beyond_slots())

    def _waiting_beyond_slots(self) -> int:
        """Submitted requests that no free slot takes at the next step (under the lock).
        While the KV pool has no room for the first waiting one (a long answer holds it),
        free slots take nobody."""
        usable = 0 if self._short_of_room else max(0, self.parallel - self._busy)
        return self._queued - usable

    @property
    def active(self) -> int:
        """Requests holding a slot (processing their prompt or generating)."""
        with self._lock:
            return self._busy

    # -- work ------------------------------------------------------------------------------

    def submit(self, request: PredictionRequest, sink: Sink) -> Prediction:
        """Queue a prediction; raises ``QueueFull`` when every slot and the queue are taken."""
        prediction = Prediction(request, sink)
        if self._closed:
            prediction.end("modelUnloaded")
            return prediction
        with self._lock:
            if self._waiting_beyond_slots() >= self.max_queue:
                raise QueueFull(self._queue_full_message())
            self._queued += 1
        self._inbox.put(prediction)
        return prediction

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between two steps and return its result."""
        job = _Job(fn)
        self._inbox.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.call(lambda: self.backend.tokenize(text, add_bos))

    def count_prompt_tokens(self, prompt: str) -> int:
        """How many tokens ``prompt`` is as a prediction's prompt (with the BOS it would get)."""
        return self.call(lambda: len(self.backend.tokenize(prompt, self.backend.wants_bos(prompt))))

    def submit_embedding(self, texts: list[str]) -> Embedding:
        """Queue embeddings; raises ``QueueFull`` when as many requests already wait."""
        job = Embedding(texts)
        if self._closed:
            self._end_embedding(job, RuntimeError("The model was unloaded."), counted=False)
            return job
        with self._lock:
            if self._embeddings_pending >= max(1, self.max_queue):
                raise QueueFull(f"{self._embeddings_pending} embedding requests are already "
                                f"waiting for {self.spec.model_key}.")
            self._embeddings_pending += 1
        self._inbox.put(job)
        return job

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.submit_embedding(texts).result()

    # -- the step loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            idle = not self._running and not self._admissible() and not self._embeddings
            if idle and self._inbox.empty() and self._stash_idle_slot():
                continue  # look for work again before the next one
            self._take_inbox(block=idle)
            if self._stopping:
                break
            self._admit()
            if self._running:
                self._timed_step()
            if self._embeddings and (not self._running or self._embed_credit > 0):
                self._embed_credit -= self._timed(self._embed_step)
            self.status = self._current_status()
        self._shutdown()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._take(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _take(self, item: Prediction | Embedding | _Job | None) -> None:
        if item is None:
            self._stopping = True
        elif isinstance(item, Prediction):
            self._waiting.append(item)
        elif isinstance(item, Embedding):
            self._embeddings.append(item)
        else:
            self._run_job(item)

    def _run_job(self, job: _Job) -> None:
        try:
            job.result = job.fn()
        except BaseException as exc:  # handed back to the caller's thread
            job.error = exc
        finally:
            job.done.set()

    # -- embeddings ------------------------------------------------------------------------

    def _timed_step(self) -> None:
        spent = self._timed(self._step_safely)
        self._embed_credit = min(self._embed_credit + spent, 1.0) if self._embeddings else 0.0

    @staticmethod
    def _timed(fn: Callable[[], None]) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    def _embed_step(self) -> None:
        """The next input of each waiting request in turn: one in all while predictions
        run, else as many as fit in EMBED_ALONE_S."""
        deadline = time.perf_counter() + (0.0 if self._running else EMBED_ALONE_S)
        while self._embeddings and not self._stopping:
            job = self._embeddings.popleft()
            if job.cancelled:  # its client left: nobody reads the rest
                self._end_embedding(job, RuntimeError("The embedding was cancelled."))
                continue
            index = len(job.vectors)
            try:
                job.vectors += self.backend.embed_texts([job.texts[index]], index)
            except BaseException as exc:  # handed back to the caller's thread
                self._end_embedding(job, exc)
                continue
            if len(job.vectors) == len(job.texts):
                self._end_embedding(job)
            else:
                self._embeddings.append(job)
            if time.perf_counter() >= deadline or not self._inbox.empty():
                return  # a prediction that just came waits for one input at most

    def _end_embedding(self, job: Embedding, error: BaseException | None = None, *,
                       counted: bool = True) -> None:
        if counted:
            with self._lock:
                self._embeddings_pending -= 1
        job.error = error
        job.done.set()

    def _admissible(self) -> bool:
        return bool(self._waiting) and any(s.seq is None for s in self.slots)

    def _current_status(self) -> Status:
        if any(not s.prompting for s in self._running):
            return "generating"
        return "processingPrompt" if self._running else "idle"

    # -- admission -------------------------------------------------------------------------

    def _admit(self) -> None:
        self._short_of_room = False
        while self._waiting and not self._stopping:
            prediction = self._waiting[0]
            if prediction.cancelled:
                self._drop_waiting("userStopped")
                continue
            if prediction.tokens is None:
                prediction.tokens = self._prompt_tokens(prediction)
            prompt = prediction.tokens
            if not prompt or len(prompt) >= self.context_length:
                self._drop_waiting("contextLengthReached", len(prompt))
                continue
            choice = choose_slot(self.slots, prompt)
            if choice is None:
                return
            hit = self._cache_hit(prompt, choice)
            if hit is not None:  # the restore brings its tokens in as new cells
                extra = max(0, len(hit.entry.tokens) - len(prompt))
                room = self._make_room(prediction, 0, set(), extra)
            else:
                room = self._make_room(prediction, choice.reuse, choice.keep())
            if not room:
                self._trim_queue()
                self._short_of_room = True  # after the trim: ``queued`` never reads more
                return
            self._start(self._waiting.popleft(), choice, hit)

    def _trim_queue(self) -> None:
        """Refuse the newest requests beyond the queue: they came in counting on free slots
        that take nobody until the KV pool has room (``submit`` knows that only from now)."""
        while len(self._waiting) > self.max_queue:
            self._fail_waiting(self._waiting.pop(),
                               Failed(self._queue_full_message(), code=QUEUE_FULL))

    def _queue_full_message(self) -> str:
        return f"{self.max_queue} requests are already waiting for {self.spec.model_key}."

    def _cache_hit(self, prompt: list[int], choice: Choice) -> Hit | None:
        """A saved state that holds more of ``prompt`` than any slot, by enough to pay."""
        if self.cache is None or not self.cache.enabled:
            return None
        hit = self.cache.lookup(self.cache_key, prompt)
        usable = min(hit.prefix, len(prompt) - 1) if hit else 0
        gain = usable - choice.reuse
        if hit is None or gain < max(MIN_RESTORE, len(hit.entry.tokens) // RESTORE_SHARE):
            return None
        return hit

    def _drop_waiting(self, reason: StopReason, prompt_tokens: int = 0) -> None:
        prediction = self._waiting.popleft()
        with self._lock:
            self._queued -= 1
        prediction.end(reason, prompt_tokens)

    def _prompt_tokens(self, prediction: Prediction) -> list[int]:
        req = prediction.request
        add_bos = req.add_bos if req.add_bos is not None else self.backend.wants_bos(req.prompt)
        return self.backend.tokenize(req.prompt, add_bos)

    def _make_room(self, prediction: Prediction, reuse: int, keep: set[int],
                   extra: int = 0) -> bool:
        """Free idle slots' caches until the new prompt and its answer fit the KV pool."""
        prompt = prediction.tokens or []
        limit = prediction.request.params.max_tokens
        answer = limit if limit is not None and limit >= 0 else 0
        need = len(prompt) - reuse + max(extra, min(answer, self.context_length - len(prompt)))
        need += sum(len(s.prompt) - s.n_past for s in self._running)
        if self._evict_until(need, keep):
            return True
        return not self._running  # alone, it may use the whole context

    def _evict_until(self, need: int, keep: set[int]) -> bool:
        idle = sorted((s for s in self.slots if s.seq is None and s.id not in keep),
                      key=lambda s: s.last_used)
        while self._free_cells() < need and idle:
            self._evict_slot(idle.pop(0))
        return self._free_cells() >= need

    def _free_cells(self) -> int:
        # cells shared through a prefix copy count twice: the estimate errs on the safe side
        return self.context_length - sum(len(s.tokens) for s in self.slots)

    def _clear_slot(self, slot: Slot) -> None:
        if slot.tokens:
            self.backend.seq_rm(slot.id, 0)
            slot.tokens = []
        slot.prompt_len = slot.saved = 0

    def _evict_slot(self, slot: Slot) -> None:
        """Give the slot up for other work, its cache saved first when worth keeping."""
        self._stash(slot)
        self._clear_slot(slot)

    def _stash_idle_slot(self) -> bool:
        """With nothing to do, save one idle slot that the prompt cache lacks: when another
        conversation needs that slot, it need not wait for the copy."""
        if self.cache is None or not self.cache.enabled:
            return False
        for slot in self.slots:
            if slot.seq is None and len(slot.tokens) >= MIN_SAVE \
                    and slot.saved != len(slot.tokens):
                self._stash(slot)
                return True
        return False

    def _stash(self, slot: Slot) -> None:
        """Save what ``slot`` holds in the prompt cache, unless it is short or already there.
        The cache is an optimisation: nothing it raises may fail a request or the loop."""
        cache = self.cache
        if cache is None or len(slot.tokens) < MIN_SAVE or not cache.enabled \
                or slot.saved == len(slot.tokens):
            slot.saved = len(slot.tokens)
            return
        slot.saved = len(slot.tokens)
        try:
            if cache.covers(self.cache_key, slot.tokens):
                return
            data = self.backend.save_state(slot.id)
            if data:
                cache.save(self.cache_key, slot.tokens, data)
        except Exception as exc:
            log.warning("Could not save a prompt's state: %s", exc)

    def _restore(self, slot: Slot, hit: Hit, prompt: list[int]) -> int:
        """Make ``slot`` hold the saved state's prefix of ``prompt``; returns its length, 0
        when the state could not be restored (the slot is then empty)."""
        assert self.cache is not None
        try:
            data = self.cache.load(hit)
        except Exception as exc:  # MemoryError, a disk that went away: decode instead
            log.warning("Could not read a saved prompt state: %s", exc)
            data = None
        self._evict_slot(slot)
        try:
            restored = data is not None and self.backend.restore_state(slot.id, data)
        except Exception as exc:
            log.warning("Could not restore a prompt's state: %s", exc)
            restored = False
        if not restored:
            if data is not None:
                log.warning("The engine refused a saved prompt state; it was dropped.")
                self.cache.discard(hit.entry)
            self.backend.seq_rm(slot.id, 0)
            return 0
        slot.tokens = hit.entry.tokens.tolist()
        slot.saved = len(slot.tokens)
        reuse = min(hit.prefix, len(prompt) - 1)
        self.cache.restored(self.cache_key, reuse)
        return self._reuse_prefix(slot, slot, reuse, prompt)

    def _start(self, prediction: Prediction, choice: Choice, hit: Hit | None = None) -> None:
        prompt = prediction.tokens or []
        slot = choice.slot
        try:
            self._use_draft(prediction.request.draft_model)
            sampler = self.backend.new_sampler(prediction.request)
        except DraftModelError as exc:
            self._fail_waiting(prediction, Failed(str(exc), code="draft_model"))
            return
        except GrammarError as exc:
            self._fail_waiting(prediction, Failed(str(exc), code="grammar"))
            return
        except Exception as exc:  # a request the backend refuses must not stop the loop
            self._fail_waiting(prediction, Failed(_describe(exc)))
            return
        reuse = self._reuse_prefix(slot, choice.source, choice.reuse, prompt) if hit is None \
            else self._restore(slot, hit, prompt)
        if self.cache is not None and hit is None and reuse < MIN_RESTORE <= len(prompt):
            self.cache.missed(self.cache_key)  # nothing of it held anywhere: a cold prompt
        seq = Sequence(prediction, prompt, slot, reuse, sampler)
        slot.seq, slot.prompt_len = seq, len(prompt)
        self._running.append(seq)
        with self._lock:
            self._queued -= 1
            self._busy += 1
        prediction.emit(PromptProgress(0.0, reuse, reuse, len(prompt)))
        if seq.limit == 0:
            self._finish(seq, "maxPredictedTokensReached")

    def _fail_waiting(self, prediction: Prediction, event: Failed) -> None:
        with self._lock:
            self._queued -= 1
        prediction.emit(event)

    def _reuse_prefix(self, slot: Slot, source: Slot, reuse: int, prompt: list[int]) -> int:
        """Make ``slot`` hold ``prompt[:reuse]`` (trimming it, or copying from ``source``)."""
        if source is slot:
            if reuse < slot.prompt_len and len(slot.tokens) - reuse >= MIN_SAVE:
                self._stash(slot)  # another conversation's, which shared a beginning
            if reuse < len(slot.tokens) and not self.backend.seq_rm(slot.id, reuse):
                self._clear_slot(slot)
                return 0
            slot.tokens = slot.tokens[:reuse]
            slot.saved = min(slot.saved, reuse)
            return reuse
        self._evict_slot(slot)
        if reuse:
            self.backend.seq_cp(source.id, slot.id, reuse)
            slot.tokens = prompt[:reuse]
        return reuse

    # -- one step --------------------------------------------------------------------------

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as exc:  # the loop must survive whatever one step does
            for seq in list(self._running):
                self._clear_slot(seq.slot)
                self._finish(seq, "failed", failure=_describe(exc))

    def _step(self) -> None:
        for seq in [s for s in self._running if s.prediction.cancelled or self._closed]:
            self._finish(seq, "modelUnloaded" if self._closed else "userStopped")
        if not self._running:
            return
        batch = self._build_batch()
        if any(s.draft for s in self._running) and not self._evict_until(len(batch), set()):
            batch = self._build_batch(drafting=False)  # guesses never crowd out real work
        if not self._fit(batch):
            return
        status = self.backend.decode(batch)
        if status == NO_ROOM:  # the pool is fragmented beyond the estimate: free all idle
            self._evict_until(self.context_length, keep=set())
            status = self.backend.decode(batch)
        if status == NO_ROOM and self._shed_prompts(batch):
            status = self.backend.decode(batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self._after_decode(batch)

    def _build_batch(self, drafting: bool = True) -> Batch:
        batch = Batch()
        generating = [s for s in self._running if not s.prompting]
        n_batch = self.backend.n_batch
        # drafted tokens share what the batch has beyond one token per generating sequence
        spare = (n_batch - len(generating)) // max(1, len(generating)) if drafting else 0
        self.speculation.guess(generating, [self._room(s, spare) for s in generating])
        for seq in generating:
            seq.logits_at = batch.add(seq.last_token, seq.n_past, seq.slot.id, True)
            seq.draft_at = [batch.add(token, seq.n_past + 1 + i, seq.slot.id, True)
                            for i, token in enumerate(seq.draft)]
            seq.chunk = 1 + len(seq.draft)
        budget = min(PROMPT_SHARE if generating else PROMPT_CHUNK, n_batch - len(batch))
        for seq in (s for s in self._running if s.prompting):
            if budget <= 0:
                seq.chunk = 0
                continue
            take = min(budget, len(seq.prompt) - seq.n_past)
            for pos in range(seq.n_past, seq.n_past + take):
                at = batch.add(seq.prompt[pos], pos, seq.slot.id, pos == len(seq.prompt) - 1)
            seq.logits_at, seq.chunk = at, take
            budget -= take
        return batch

    def _fit(self, batch: Batch) -> bool:
        """Make the KV pool hold this batch: evict idle caches, else shed work."""
        if self._evict_until(len(batch), keep=set()):
            return True
        if self._shed_prompts(batch):
            return bool(len(batch)) and self._fit(batch)
        fullest = max(self._running, key=lambda s: s.n_past)
        self._finish(fullest, "contextLengthReached")
        self._clear_slot(fullest.slot)
        return False

    def _shed_prompts(self, batch: Batch) -> bool:
        """Take the prompt chunks out of the batch (generating slots go first)."""
        prompting = [s for s in self._running if s.prompting and s.chunk]
        for seq in prompting:
            seq.chunk = 0
        batch.keep_only({s.slot.id for s in self._running if not s.prompting})
        return bool(prompting)

    def _after_decode(self, batch: Batch) -> None:
        for seq in list(self._running):
            if not seq.chunk:
                continue
            if not seq.prompting:
                self._verify(seq)
                continue
            seq.slot.tokens.extend(seq.prompt[seq.n_past:seq.n_past + seq.chunk])
            seq.n_past += seq.chunk
            seq.progress()
            if not seq.prompting:
                self._on_token(seq, self.backend.sample(seq.sampler, seq.logits_at))
        for seq in self._running:
            seq.flush()

    def _room(self, seq: Sequence, spare: int) -> int:
        room = min(spare, self.context_length - seq.n_past - 2)
        if seq.limit is not None:
            room = min(room, seq.limit - seq.predicted - 1)
        return room

    def _use_draft(self, draft: DraftModel | None) -> None:
        self.speculation.use(draft, self.context_length, self.parallel)

    def _verify(self, seq: Sequence) -> None:
        """Sample after the decoded token and, while each sample is the next drafted token
        (already decoded), after that one too. The sampler sees the same tokens in the same
        order as without drafting, so the output is the same; what the model did not write
        is removed from the KV cache."""
        self._keep(seq, seq.last_token)
        at, accepted = seq.logits_at, 0
        seq.drafted += len(seq.draft)  # counted first: the last token may end the prediction
        while True:
            token = self.backend.sample(seq.sampler, at)
            if accepted < len(seq.draft) and token == seq.draft[accepted]:
                seq.accepted += 1
            self._on_token(seq, token)
            if seq.slot.seq is not seq or accepted == len(seq.draft):
                break
            if token != seq.draft[accepted]:
                if seq.drafter is not None:
                    seq.drafter.rejected(seq.draft[accepted], token)
                break
            self._keep(seq, token)
            at, accepted = seq.draft_at[accepted], accepted + 1
        if accepted < len(seq.draft) and not self.backend.seq_rm(seq.slot.id, seq.n_past):
            raise RuntimeError("llama.cpp could not drop the rejected draft tokens")
        if seq.draft and seq.drafter is not None:
            seq.drafter.verified(accepted)

    def _keep(self, seq: Sequence, token: int) -> None:
        """``token`` is decoded into the sequence's KV cache, at ``n_past``."""
        seq.slot.tokens.append(token)
        seq.n_past += 1
        if seq.drafter is not None:
            seq.drafter.extend((token,))

    def _on_token(self, seq: Sequence, token: int) -> None:
        if self.backend.is_eog(token):
            self._finish(seq, "eosFound")
            return
        stop = seq.take(token, self.backend.piece(token))
        if stop is not None:
            self._finish(seq, "stopStringFound", stop)
        elif seq.limit is not None and seq.predicted >= seq.limit:
            self._finish(seq, "maxPredictedTokensReached")
        elif seq.n_past + 1 >= self.context_length:
            self._finish(seq, "contextLengthReached")

    def _finish(self, seq: Sequence, reason: StopReason, stop: str | None = None, *,
                failure: str | None = None) -> None:
        self._running.remove(seq)
        seq.slot.seq = None
        seq.slot.last_used = time.monotonic()
        with self._lock:
            self._busy -= 1
        with contextlib.suppress(Exception):
            self.backend.free_sampler(seq.sampler)
        if failure is not None:
            seq.prediction.emit(Failed(failure))
        else:
            seq.finish(reason, stop)

    def _shutdown(self) -> None:
        for seq in list(self._running):
            self._finish(seq, "modelUnloaded")
        with contextlib.suppress(Exception):
            self._keep_caches()
        while self._waiting:
            self._drop_waiting("modelUnloaded")
        self._take_inbox(block=False)
        while self._waiting:
            self._drop_waiting("modelUnloaded")
        while self._embeddings:
            self._end_embedding(self._embeddings.popleft(),
                                RuntimeError("The model was unloaded."))
        # a failure while freeing must never hang the caller waiting in close()
        with contextlib.suppress(Exception):
            self.backend.unload()
        # freed first: the states queued for the disk are Python memory, not the model's
        if self.cache is not None and not self.cache.written(PERSIST_S):
            log.warning("Some saved prompt states were not written to disk in time.")
        self._fail_late_calls()

    def _keep_caches(self) -> None:
        """Before unloading, what the slots hold goes to the prompt cache, and what it holds
        for this model is queued for its disk, for the next load."""
        if self.cache is None or self.status == "loading":
            return
        for slot in self.slots:
            self._stash(slot)
        self.cache.persist(self.cache_key)

    def _fail_late_calls(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                item.error = RuntimeError("The model was unloaded.")
                item.done.set()
            elif isinstance(item, Embedding):
                self._end_embedding(item, RuntimeError("The model was unloaded."))
            elif isinstance(item, Prediction):
                with self._lock:
                    self._queued -= 1
                item.end("modelUnloaded")

    # -- what the backend knows ------------------------------------------------------------

    def _load(self, on_progress: ProgressFn | None) -> None:
        n_seq = 1 if self.spec.is_embedding else self.parallel
        self.context_length = self.backend.load(self.context_length, n_seq, on_progress)

    @property
    def engine_name(self) -> str:
        return self.backend.name

    @property
    def engine_version(self) -> str:
        return self.backend.version

    def check_grammar(self, grammar: str) -> str | None:
        """Why the backend would reject this GBNF grammar, or None when it accepts it."""
        return self.backend.check_grammar(grammar)

    @property
    def bos_token(self) -> str:
        return self.backend.bos_token

    @property
    def eos_token(self) -> str:
        return self.backend.eos_token


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, PredictionFailure) else f"{type(exc).__name__}: {exc}"


class Engine:
    """Creates instances. The server holds one engine; tests register a fake one."""

    name = "base"
    version = "0"
    prompt_cache: PromptCache | None = None  # given to each instance it loads

    def backend(self, spec: ModelSpec, options: LoadOptions) -> Backend:
        raise NotImplementedError

    def create(self, spec: ModelSpec, options: LoadOptions) -> ModelInstance:
        return ModelInstance(spec, options, self.backend(spec, options))

    def load(self, spec: ModelSpec, options: LoadOptions,
             on_progress: ProgressFn | None = None) -> ModelInstance:
        instance = self.create(spec, options)
        instance.cache = self.prompt_cache
        try:
            instance.start(on_progress)
        except BaseException:
            instance.close()
            raise
        return instance
