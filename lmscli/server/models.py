"""Loaded models: load once, JIT on request, idle TTL, unload."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmscli import catalog, linkstore
from lmscli.engine import (
    DraftModel,
    DraftModelError,
    Engine,
    LoadOptions,
    ModelInstance,
    ModelSpec,
)
from lmscli.errors import InvalidModelFileError
from lmscli.server.errors import APIError, bad_request, model_not_found, shorten

if TYPE_CHECKING:
    from lmscli.logbus import LogBus

JIT_TTL_S = 3600  # LM Studio unloads JIT-loaded models after 60 idle minutes
MAX_IDENTIFIER_CHARS = 256
# Instances of one model: each holds its own weights and KV cache, and a script that loads
# in a loop would otherwise fill the machine's memory one copy at a time.
MAX_INSTANCES_PER_MODEL = 8
MAX_NAME_CHARS = 1000  # longer names can't be a model key or path: not looked up
DEFAULT_CONTEXT = 4096  # what the engine uses for a model that doesn't say
MAX_UNKNOWN_CONTEXT = 131072  # the bound for a model whose trained context is unknown
KV_BYTES = 2  # llama.cpp's default cache holds f16 keys and values
MAX_PARALLEL = 64  # sequences one context decodes together (llama.cpp allows up to 256)


@dataclass
class Loaded:
    identifier: str
    model: Any  # catalog.LocalModel
    instance: ModelInstance
    ttl_s: float | None
    jit: bool
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    active: int = 0  # requests that hold it right now
    bus: LogBus | None = None  # where its predictions are logged (lms log stream)

    def touch(self) -> None:
        self.last_used = time.time()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Loaded]:
        """The model is in use meanwhile: the TTL reaper leaves it alone, and its idle time
        counts from the end."""
        self.active += 1
        self.touch()
        try:
            yield self
        finally:
            self.active -= 1
            self.touch()

    def ttl_remaining(self) -> float | None:
        if self.ttl_s is None:
            return None
        return max(0.0, self.ttl_s - (time.time() - self.last_used))

    def info(self) -> dict[str, Any]:
        """LM Studio's model instance info, plus status and queue."""
        info = self.model.model_info()
        info.update({
            "identifier": self.identifier,
            "instanceReference": self.identifier,
            "ttlMs": int(self.ttl_s * 1000) if self.ttl_s is not None else None,
            "ttlRemainingMs": (int(self.ttl_remaining() * 1000)  # type: ignore[operator]
                               if self.ttl_s is not None else None),
            "lastUsedTime": int(self.last_used * 1000),
            "contextLength": self.instance.context_length,
            "status": self.instance.status,
            "queued": self.instance.queued,
            "parallel": None if self.instance.spec.is_embedding else self.instance.parallel,
            "speculative": self.instance.options.speculative,
            "jit": self.jit,
        } | draft_info(self.instance.options))
        cache = self.instance.cache
        if cache is not None and cache.enabled and not self.instance.spec.is_embedding:
            info["promptCache"] = cache.stats(self.instance.cache_key)
        return info


ProgressCb = Callable[[float], "bool | None"]  # False aborts the load


@dataclass
class LoadProgress:
    progress: float  # 0..1


@dataclass
class LoadDone:
    entry: Loaded
    seconds: float | None  # None: it was loaded already, or by another request


@dataclass
class LoadStart:
    model: Any  # catalog.LocalModel: a just-in-time load of it begins


LoadEvent = LoadProgress | LoadDone
JitEvent = LoadStart | LoadProgress | LoadDone
EventCb = Callable[[str, str, str | None], None]  # level, message, model identifier


class ModelManager:
    def __init__(self, engine: Engine, *, on_event: EventCb | None = None,
                 bus: LogBus | None = None, parallel: int = 4, max_queue: int = 64) -> None:
        self.engine = engine
        self.parallel = parallel  # for loads that don't say, JIT loads included
        self.max_queue = max_queue
        self.loaded: dict[str, Loaded] = {}
        self._loading: dict[str, asyncio.Future[Loaded]] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._on_event: EventCb = on_event or (lambda level, msg, identifier: None)
        self.bus = bus

    # -- lookup ----------------------------------------------------------------------------

    def downloaded(self) -> list[Any]:
        return catalog.list_models()

    def find_loaded(self, name: str) -> Loaded | None:
        if name in self.loaded:
            return self.loaded[name]
        lowered = name.lower()
        for entry in self.loaded.values():
            if lowered in (entry.identifier.lower(), entry.model.model_key.lower(),
                           entry.model.path.lower()):
                return entry
        return None

    def instances(self, model_key: str) -> list[Loaded]:
        """The loaded instances of one model, oldest first."""
        return sorted((e for e in self.loaded.values() if e.model.model_key == model_key),
                      key=lambda e: e.loaded_at)

    def reusable(self, model_key: str, context_length: int | None) -> Loaded | None:
        """The oldest instance of the model that a load asking for ``context_length`` (None:
        any) can use instead of loading another."""
        return next((e for e in self.instances(model_key)
                     if context_length in (None, e.instance.context_length)), None)

    def check_instances(self, model_key: str) -> None:
        """A 409 when the model has as many instances as one model may."""
        instances = self.instances(model_key)
        if len(instances) >= MAX_INSTANCES_PER_MODEL:
            names = ", ".join(e.identifier for e in instances)
            raise APIError(409, f"{model_key} is loaded {len(instances)} times, the most one "
                           f"model may be. Use one of its instances ({names}) or unload one "
                           "first: lms unload <identifier>", param="model",
                           code="too_many_instances")

    def pending(self, model_key: str) -> asyncio.Future[Loaded] | None:
        """The load of ``model_key`` that is under way, if one is."""
        return self._loading.get(model_key)

    def load_lock(self, model_key: str) -> asyncio.Lock:
        """Held while deciding to load ``model_key`` just in time and loading it, so that two
        requests at once load it once (``get_or_load_events``)."""
        return self._load_locks.setdefault(model_key, asyncio.Lock())

    def resolve_downloaded(self, name: str) -> Any:
        plausible = name.isprintable() and len(name) <= MAX_NAME_CHARS
        model = catalog.find_model(name) if plausible else None
        if model is None:
            available = [m.model_key for m in self.downloaded()]
            raise model_not_found(name, available)
        return model

    # -- loading ---------------------------------------------------------------------------

    def _found(self, name: str, ttl_s: float | None) -> Loaded | None:
        entry = self.find_loaded(name)
        if entry is not None:
            if ttl_s is not None and entry.jit:
                entry.ttl_s = ttl_s
            entry.touch()
        return entry

    async def get_or_load_events(self, name: str, *, ttl_s: float | None = None,
                                 context_length: int | None = None, jit: bool = True,
                                 **options: Any) -> AsyncGenerator[JitEvent, None]:
        """The model called ``name``: at once when it is loaded (``LoadDone`` without
        seconds), else a load of the downloaded one as events (``LoadStart``, progress,
        ``LoadDone``). Requests that ask at once load it once. Close the events when done
        (``contextlib.aclosing``): meanwhile they hold the model's load lock."""
        if (entry := self._found(name, ttl_s)) is not None:
            yield LoadDone(entry, None)
            return
        model = self.resolve_downloaded(name)
        async with self.load_lock(model.model_key):
            entry = self._found(name, ttl_s)
            if entry is None and (pending := self.pending(model.model_key)) is not None:
                entry = await asyncio.shield(pending)  # a load that began elsewhere
            if entry is not None:
                yield LoadDone(entry, None)
                return
            if not jit:  # a JIT load checks the fit itself, once the last JIT model is gone
                await self.check_load(model.model_key, None, context_length)
            yield LoadStart(model)
            events = self.load_events(model.model_key, context_length=context_length,
                                      ttl_s=ttl_s or (JIT_TTL_S if jit else None), jit=jit,
                                      **options)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()  # the client left: abort the load between tensors

    async def get_or_load(self, name: str, *, ttl_s: float | None = None,
                          context_length: int | None = None) -> Loaded:
        """The loaded model called ``name``, else a JIT load of the downloaded one."""
        async with contextlib.aclosing(self.get_or_load_events(
                name, ttl_s=ttl_s, context_length=context_length)) as events:
            async for event in events:
                if isinstance(event, LoadDone):
                    return event.entry
        raise AssertionError("a load ends with its model, or raises")

    async def check_load(self, name: str, identifier: str | None,
                         context_length: int | None) -> Any:
        """The downloaded model a load would use; raises the 4xx a load would end in, so a
        caller can refuse before it starts streaming progress."""
        model = self.resolve_downloaded(name)
        if identifier is not None:
            check_identifier(identifier)
        if identifier and identifier in self.loaded:
            raise APIError(409, f'A model with identifier "{identifier}" is already loaded.',
                           param="identifier", code="identifier_in_use")
        self.check_instances(model.model_key)
        await self.check_fits(model, context_length)
        return model

    async def load_events(self, name: str, **options: Any) -> AsyncGenerator[LoadEvent, None]:
        """``load`` as events: progress (at most one a percent), then the loaded model. An
        error of the load is raised from the iterator; closing it early aborts the load."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[float] = asyncio.Queue()
        stop = threading.Event()
        last = -1.0

        def on_progress(progress: float) -> bool:
            nonlocal last
            # llama.cpp reports once per tensor: one event per percent is plenty
            if progress >= 1.0 or progress - last >= 0.01:
                last = progress
                loop.call_soon_threadsafe(queue.put_nowait, progress)
            return not stop.is_set()

        started = time.perf_counter()
        task = asyncio.create_task(self.load(name, on_progress=on_progress, **options))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                yield LoadProgress(getter.result())
            while not queue.empty():
                yield LoadProgress(queue.get_nowait())
            yield LoadDone(task.result(), time.perf_counter() - started)
        finally:
            stop.set()  # a no-op once loaded; otherwise the load stops between tensors

    async def load(self, name: str, *, identifier: str | None = None,
                   context_length: int | None = None, gpu_ratio: float | None = None,
                   ttl_s: float | None = None, jit: bool = False, parallel: int | None = None,
                   speculative: Literal["off", "ngram"] | None = None,
                   draft_model: DraftModel | None = None, draft_max: int | None = None,
                   draft_min: int = 0, on_progress: ProgressCb | None = None) -> Loaded:
        model = self.resolve_downloaded(name)
        if model.type == "embedding" and (draft_model or draft_max or draft_min):
            raise bad_request(f"{model.model_key} is an embedding model: it takes no "
                              "speculative decoding options.", "draft_model")
        if identifier is not None:
            check_identifier(identifier)
        identifier = identifier or self._free_identifier(model.model_key)
        if identifier in self.loaded:
            raise APIError(409, f'A model with identifier "{identifier}" is already loaded.',
                           param="identifier", code="identifier_in_use")
        self.check_instances(model.model_key)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Loaded] = loop.create_future()
        self._loading[model.model_key] = future
        try:
            if jit:
                await self._evict_jit()
            options = LoadOptions(context_length=context_length, gpu_ratio=gpu_ratio,
                                  parallel=parallel or self.parallel, max_queue=self.max_queue,
                                  speculative=speculative or "ngram",
                                  draft_model=draft_model, draft_max=draft_max,
                                  draft_min=draft_min)
            entry = await self._load_now(model, identifier, options, ttl_s, jit, on_progress)
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._loading.pop(model.model_key, None)

    async def _load_now(self, model: Any, identifier: str, options: LoadOptions,
                        ttl_s: float | None, jit: bool,
                        on_progress: ProgressCb | None) -> Loaded:
        context_length = options.context_length
        if context_length is not None and context_length < 1:
            raise APIError(400, "context_length must be at least 1.", param="context_length")
        spec = ModelSpec(path=str(model.abs_path), model_key=model.model_key,
                         architecture=model.architecture,
                         max_context_length=model.max_context_length,
                         chat_template=model.chat_template,
                         is_embedding=model.type == "embedding")
        await self.check_fits(model, options.context_length)
        self._on_event("info", f"Loading {model.model_key} as {identifier}", identifier)
        started = time.perf_counter()
        try:
            instance = await asyncio.to_thread(self.engine.load, spec, options, on_progress)
        except InvalidModelFileError as exc:
            self._on_event("error", exc.message, identifier)
            raise APIError(422, exc.message, param="model", code="model_load_failed") from exc
        except DraftModelError as exc:
            self._on_event("error", str(exc), identifier)
            raise APIError(400, str(exc), param="draft_model",
                           code="invalid_draft_model") from exc
        except Exception as exc:
            self._on_event("error", f"Failed to load {model.model_key}: {exc}", identifier)
            raise
        entry = Loaded(identifier, model, instance, ttl_s, jit, bus=self.bus)
        self.loaded[identifier] = entry
        self._on_event("info", f"Loaded {identifier} in {time.perf_counter() - started:.2f}s",
                       identifier)
        return entry

    async def check_fits(self, model: Any, context_length: int | None) -> None:
        """A 400 before loading what would not fit: a context past what the model was trained
        for, or more memory than is free (llama.cpp would allocate it, then be killed)."""
        trained = model.max_context_length
        n_ctx = context_length or trained or DEFAULT_CONTEXT
        bound = trained or MAX_UNKNOWN_CONTEXT
        if n_ctx > bound:
            what = f"{model.model_key} was trained for" if trained else "is supported"
            raise APIError(400, f"context_length {n_ctx} is more than {what} ({bound} tokens).",
                           param="context_length", code="context_length_too_large")
        needed = await asyncio.to_thread(load_bytes, model.abs_path, model.size_bytes, n_ctx)
        free = mem_available()
        cache = self.engine.prompt_cache
        if free is not None and needed > free and cache is not None:
            free += cache.release(needed - free)  # saved prompts yield to a model
        if free is not None and needed > free:
            raise APIError(400, f"Loading {model.model_key} with a context of {n_ctx} tokens "
                           f"needs about {needed / 2**30:.1f} GiB of memory, and "
                           f"{free / 2**30:.1f} GiB is free. Load it with a smaller "
                           "context_length, or unload another model.",
                           param="context_length", code="insufficient_memory")

    def _free_identifier(self, key: str) -> str:
        if key not in self.loaded:
            return key
        n = 2
        while f"{key}:{n}" in self.loaded:
            n += 1
        return f"{key}:{n}"

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, identifier: str) -> Loaded:
        entry = self.loaded.pop(identifier, None)
        if entry is None:
            raise APIError(404, f'No model with identifier "{shorten(identifier)}" is loaded.',
                           param="identifier", code="model_not_loaded")
        await asyncio.to_thread(entry.instance.close)
        self._on_event("info", f"Unloaded {identifier}", identifier)
        return entry

    async def unload_all(self) -> list[str]:
        ids = list(self.loaded)
        for identifier in ids:
            await self.unload(identifier)
        return ids

    async def _evict_jit(self) -> None:
        """At most one JIT-loaded model at a time (LM Studio's auto-evict)."""
        for entry in list(self.loaded.values()):
            if entry.jit and entry.active == 0:
                await self.unload(entry.identifier)

    async def reap_idle(self) -> None:
        for entry in list(self.loaded.values()):
            remaining = entry.ttl_remaining()
            if remaining is not None and remaining <= 0 and entry.active == 0:
                self._on_event("info", f"Unloading {entry.identifier}: idle TTL expired",
                               entry.identifier)
                await self.unload(entry.identifier)

    async def reaper(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.reap_idle()


def draft_info(options: LoadOptions) -> dict[str, Any]:
    """The load's draft model (its key) and draft length limits, for the instance info."""
    draft = options.draft_model
    return {"draftModel": draft.model_key if draft is not None else None,
            "draftMaxTokens": options.draft_max, "draftMinTokens": options.draft_min}


def find_draft(name: str, param: str = "draft_model") -> DraftModel:
    """The downloaded model called ``name`` (as a load finds one), to draft with; ``param``
    names the field that asked, for errors."""
    plausible = name.isprintable() and len(name) <= MAX_NAME_CHARS
    model = catalog.find_model(name) if plausible else None
    if model is None:
        raise APIError(404, f"Draft model '{shorten(name)}' not found. Run `lms ls` to see "
                       "your models.", param=param, code="model_not_found")
    if model.type != "llm":
        raise bad_request(f"'{param}': {model.model_key} is an embedding model; a draft "
                          "model must be a language model.", param)
    return DraftModel(str(model.abs_path), model.model_key)


def check_draft_range(most: int | None, least: int | None, names: tuple[str, str]) -> None:
    """A 400 when the shortest draft worth verifying is longer than the longest draft; the
    bounds of each are the caller's to check. ``names``: the two fields, as sent."""
    if most is not None and least is not None and least > most:
        raise bad_request(f"'{names[1]}' ({least}) must not be more than '{names[0]}' "
                          f"({most}).", names[1])


def check_identifier(identifier: str) -> None:
    """Identifiers show in every listing and log line: printable text of bounded length,
    never mistaken for a linked model's name."""
    if not identifier.strip() or len(identifier) > MAX_IDENTIFIER_CHARS \
            or not identifier.isprintable():
        raise APIError(400, f"'identifier' must be 1 to {MAX_IDENTIFIER_CHARS} printable "
                       "characters, not only spaces.", param="identifier",
                       code="invalid_identifier")
    clash = linkstore.identifier_clash(identifier)
    if clash is not None:
        raise APIError(400, clash, param="identifier", code="invalid_identifier")


def load_bytes(path: Path, file_bytes: int, n_ctx: int) -> int:
    """Memory a load takes: the weights plus the KV cache, K and V for every layer and
    position (unified: the context is shared by parallel sequences, not multiplied)."""
    from lmscli.catalog.gguf import read_gguf_metadata

    try:
        kv = read_gguf_metadata(path).kv
    except Exception:  # the engine reports a bad file better; count the weights only
        return file_bytes
    return file_bytes + n_ctx * kv_bytes_per_token(kv)


def kv_bytes_per_token(kv: dict[str, Any]) -> int:
    """From GGUF metadata; 0 when the model doesn't say enough to tell."""
    arch = kv.get("general.architecture")

    def count(key: str, default: int | None = None) -> int | None:
        value = kv.get(f"{arch}.{key}", default)
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value if ok else None

    layers, width, heads = count("block_count"), count("embedding_length"), \
        count("attention.head_count")
    if not (layers and width and heads):
        return 0
    kv_heads = count("attention.head_count_kv") or heads  # per-layer arrays aren't read
    key = count("attention.key_length") or width // heads
    value = count("attention.value_length") or width // heads
    return layers * kv_heads * (key + value) * KV_BYTES


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
