"""What one running server holds, typed: its settings, engine, models, links, log bus, the
predictions that can be cancelled by id, and the responses kept for later turns."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from starlette.requests import HTTPConnection

from lmscli import paths
from lmscli.engine import Engine
from lmscli.engine.promptcache import DEFAULT_DISK_BYTES, PromptCache, default_ram_bytes
from lmscli.logbus import LogBus
from lmscli.server.links.linked import Linked
from lmscli.server.models import ModelManager
from lmscli.server.security import DEFAULT_MAX_BODY_MB, Guard, HostPolicy, max_body_bytes

T = TypeVar("T")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 1234
    cors: bool = False
    reap_every_s: float = 1.0
    api_key: str | None = None  # None: no key needed (start-up refuses that off loopback)
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the built-in ones
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    parallel: int = 4  # slots per model for loads that don't say (JIT loads included)
    max_queue: int = 64  # requests that may wait for a slot, per model, before 503s
    sdk_port: int | None = None  # the loopback port also served for lmstudio SDK discovery
    link_refresh_s: float = 30.0  # how often linked engines are asked for their models
    cache_ram: int | None = None  # bytes of saved prompt states in RAM; None: the default
    cache_dir: Path | None = None  # where they are also kept on disk; None: the default
    cache_disk: int = DEFAULT_DISK_BYTES  # bytes on disk; 0: not on disk
    # /api/v1/chat's ephemeral MCP servers may be at loopback or private addresses
    allow_local_mcp: bool = False

    def prompt_cache(self) -> PromptCache:
        ram = default_ram_bytes() if self.cache_ram is None else self.cache_ram
        return PromptCache(ram, self.cache_dir or paths.prompt_cache_dir(), self.cache_disk)

    def guard(self) -> Guard:
        hosts = HostPolicy.for_bind(self.host, self.allowed_hosts, keyed=bool(self.api_key))
        return Guard(hosts, self.api_key or None, max_body_bytes(self.max_body_mb),
                     any_origin=self.cors)


class Kept(Generic[T]):
    """Items kept in memory by id, the oldest dropped past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, T] = OrderedDict()

    def put(self, key: str, item: T) -> None:
        self._items[key] = item
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def delete(self, key: str) -> bool:
        return self._items.pop(key, None) is not None


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    models: ModelManager
    logs: LogBus
    linked: Linked
    uvicorn_server: Any = None  # None when the app runs under another server (tests)
    # /lmscli/predict streams by id, local and linked, for their cancel route
    predictions: dict[str, Cancellable] = field(default_factory=dict)
    # what an API module keeps between requests (stored responses, download jobs), by name
    parts: dict[str, Any] = field(default_factory=dict)

    def part(self, name: str, make: Callable[[], T]) -> T:
        """The API module's own state called ``name``, made on first use."""
        if name not in self.parts:
            self.parts[name] = make()
        return self.parts[name]


def app_state(connection: HTTPConnection) -> AppState:
    """The state of the server that a request or websocket reached."""
    return connection.app.state.server
