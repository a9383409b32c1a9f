"""Loaded models: load once, JIT on request, idle TTL, unload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmscli import catalog
from lmscli.engine import Engine, LoadOptions, ModelInstance, ModelSpec
from lmscli.errors import InvalidModelFileError
from lmscli.server.errors import APIError, model_not_found

if TYPE_CHECKING:
    from lmscli.logbus import LogBus

JIT_TTL_S = 3600  # LM Studio unloads JIT-loaded models after 60 idle minutes


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
            "parallel": 1,
            "jit": self.jit,
        })
        return info


ProgressCb = Callable[[float], None]
EventCb = Callable[[str, str, str | None], None]  # level, message, model identifier


class ModelManager:
    def __init__(self, engine: Engine, *, on_event: EventCb | None = None,
                 bus: LogBus | None = None) -> None:
        self.engine = engine
        self.loaded: dict[str, Loaded] = {}
        self._loading: dict[str, asyncio.Future[Loaded]] = {}
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

    def _resolve_downloaded(self, name: str) -> Any:
        model = catalog.find_model(name)
        if model is None:
            available = [m.model_key for m in self.downloaded()]
            raise model_not_found(name, available)
        return model

    # -- loading ---------------------------------------------------------------------------

    async def get_or_load(self, name: str, *, ttl_s: float | None = None) -> Loaded:
        """The loaded model called ``name``, else a JIT load of the downloaded one."""
        entry = self.find_loaded(name)
        if entry is not None:
            if ttl_s is not None and entry.jit:
                entry.ttl_s = ttl_s
            entry.touch()
            return entry
        model = self._resolve_downloaded(name)
        pending = self._loading.get(model.model_key)
        if pending is not None:
            return await asyncio.shield(pending)
        return await self.load(model.model_key, ttl_s=ttl_s or JIT_TTL_S, jit=True)

    async def load(self, name: str, *, identifier: str | None = None,
                   context_length: int | None = None, gpu_ratio: float | None = None,
                   ttl_s: float | None = None, jit: bool = False,
                   on_progress: ProgressCb | None = None) -> Loaded:
        model = self._resolve_downloaded(name)
        identifier = identifier or self._free_identifier(model.model_key)
        if identifier in self.loaded:
            raise APIError(409, f'A model with identifier "{identifier}" is already loaded.',
                           param="identifier", code="identifier_in_use")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Loaded] = loop.create_future()
        self._loading[model.model_key] = future
        try:
            if jit:
                await self._evict_jit()
            entry = await self._load_now(model, identifier, context_length, gpu_ratio, ttl_s,
                                         jit, on_progress)
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._loading.pop(model.model_key, None)

    async def _load_now(self, model: Any, identifier: str, context_length: int | None,
                        gpu_ratio: float | None, ttl_s: float | None, jit: bool,
                        on_progress: ProgressCb | None) -> Loaded:
        if context_length is not None and context_length < 1:
            raise APIError(400, "context_length must be at least 1.", param="context_length")
        spec = ModelSpec(path=str(model.abs_path), model_key=model.model_key,
                         architecture=model.architecture,
                         max_context_length=model.max_context_length,
                         chat_template=model.chat_template,
                         is_embedding=model.type == "embedding")
        options = LoadOptions(context_length=context_length, gpu_ratio=gpu_ratio)
        self._on_event("info", f"Loading {model.model_key} as {identifier}", identifier)
        started = time.perf_counter()
        try:
            instance = await asyncio.to_thread(self.engine.load, spec, options, on_progress)
        except InvalidModelFileError as exc:
            self._on_event("error", exc.message, identifier)
            raise APIError(422, exc.message, param="model", code="model_load_failed") from exc
        except Exception as exc:
            self._on_event("error", f"Failed to load {model.model_key}: {exc}", identifier)
            raise
        entry = Loaded(identifier, model, instance, ttl_s, jit, bus=self.bus)
        self.loaded[identifier] = entry
        self._on_event("info", f"Loaded {identifier} in {time.perf_counter() - started:.2f}s",
                       identifier)
        return entry

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
            raise APIError(404, f'No model with identifier "{identifier}" is loaded.',
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
