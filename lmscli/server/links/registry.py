"""Linked engines: OpenAI-compatible upstreams (vLLM, SGLang, llama-server, Ollama, another
lmscli) whose models this server lists and serves by key.

The registry keeps each link's last model listing, refreshed in the background, so that
resolving a request's model never waits on an upstream: a link that is down costs local
models nothing. A model key offered by several links is one model with replicas; requests go
to the replica with the fewest requests in flight, and one that failed is tried last for a
while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from lmscli import linkstore
from lmscli.linkstore import LinkConfig
from lmscli.server.errors import APIError, shorten

log = logging.getLogger("lmscli.server.links.registry")

REFRESH_EVERY_S = 30.0
LIST_TIMEOUT_S = 2.0  # a model listing is small: an engine slower than this counts as down
DOWN_FOR_S = 15.0  # a replica that failed a request is tried last for this long
MAX_MODELS = 1000  # per link: a listing is untrusted input that ends up in every table
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class UpstreamModel:
    id: str
    context_length: int | None = None


@dataclass
class Link:
    config: LinkConfig
    models: list[UpstreamModel] = field(default_factory=list)  # the last listing that worked
    listed: bool = False  # whether a listing ever worked
    reachable: bool | None = None  # None until the first check
    error: str | None = None
    checked_at: float | None = None
    down_until: float = 0.0
    in_flight: int = 0
    last_used: float = 0.0
    served: int = 0  # requests it answered (for `lms link ls --json` and bench/)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url

    def headers(self) -> dict[str, str]:
        # identity: the relay passes the upstream's bytes on as they are, so they must be plain
        headers = {"Accept-Encoding": "identity"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def model_ids(self) -> set[str]:
        return {m.id for m in self.models}

    def down(self, now: float | None = None) -> bool:
        return self.reachable is False or (now or time.monotonic()) < self.down_until

    def mark_down(self, error: str) -> None:
        self.error = error
        self.down_until = time.monotonic() + DOWN_FOR_S
        log.warning("Link %s failed: %s", self.name, error)

    def info(self) -> dict[str, Any]:
        """The link as `lms link ls` shows it; never its key."""
        return self.config.public() | {
            "reachable": self.reachable, "error": self.error,
            "models": [m.id for m in self.models], "inFlight": self.in_flight,
            "served": self.served,
            "checkedAt": int(self.checked_at * 1000) if self.checked_at else None,
        }


@dataclass
class LinkTarget:
    """Where a request for a linked model goes: the upstream's name for it and the links
    that offer it (replicas)."""

    model: str
    links: list[Link]
    identifier: str  # the name it is listed under here


@dataclass
class LinkedModel:
    key: str
    links: list[Link]
    context_length: int | None
    identifier: str

    @property
    def device(self) -> str:
        return ", ".join(link.name for link in self.links)

    @property
    def status(self) -> str:
        if all(link.down() for link in self.links):
            return "unreachable"
        return "generating" if any(link.in_flight for link in self.links) else "idle"

    def info(self) -> dict[str, Any]:
        """LM Studio's model instance info (what `lms ps` and the SDK read), with the
        links that serve it as ``device``."""
        first = self.links[0].name
        return {
            "type": "llm", "modelKey": self.key, "format": "linked",
            "displayName": self.key, "publisher": first,
            "path": f"{first}/{self.key}", "sizeBytes": 0,
            "indexedModelIdentifier": f"{first}/{self.key}", "deviceIdentifier": None,
            "paramsString": None, "architecture": None, "quantization": None,
            "vision": False, "trainedForToolUse": False,
            "maxContextLength": self.context_length, "identifier": self.identifier,
            "instanceReference": self.identifier, "ttlMs": None, "ttlRemainingMs": None,
            "lastUsedTime": None, "contextLength": self.context_length,
            "status": self.status, "queued": 0, "parallel": None, "jit": False,
            "device": self.device, "links": [link.name for link in self.links],
            "aliases": self.aliases(),
        }

    def aliases(self) -> list[str]:
        """Every name that reaches it: its identifier and ``LINK/key`` for each link."""
        names = [self.identifier] + [f"{link.name}/{self.key}" for link in self.links]
        return list(dict.fromkeys(names))


Lookup = Callable[[str], bool]
Names = Callable[[], set[str]]


class Links:
    """The registry. ``is_loaded`` and ``is_downloaded`` tell whether a name is a local model,
    ``local_names`` gives every such name at once (lowercased) for listings: a local model
    always wins its bare key, so linking an engine never changes what a request for a local
    model gets (the linked one stays reachable as ``LINK/key``)."""

    def __init__(self, configs: list[LinkConfig], http: httpx.AsyncClient, *,
                 is_loaded: Lookup, is_downloaded: Lookup, local_names: Names,
                 save: Callable[[list[LinkConfig]], None] = linkstore.save) -> None:
        self.links: dict[str, Link] = {c.name: Link(c) for c in configs}
        self.http = http
        self.is_loaded = is_loaded
        self.is_downloaded = is_downloaded
        self.local_names = local_names
        self._save = save
        self._task: asyncio.Task[None] | None = None

    # -- life -----------------------------------------------------------------------------

    def start(self, every_s: float = REFRESH_EVERY_S) -> None:
        """Refresh in the background from now on: start-up never waits for an upstream."""
        self._task = asyncio.create_task(self._refresh_forever(every_s))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_forever(self, every_s: float) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the refreshes for good
                log.exception("Refreshing the linked engines failed")
            await asyncio.sleep(every_s)

    # -- configuration --------------------------------------------------------------------

    def add(self, config: LinkConfig) -> Link:
        if config.name in self.links:
            raise APIError(409, f'A link named "{config.name}" already exists. Remove it first '
                           f"with: lms link rm {config.name}", param="name", code="link_exists")
        link = Link(config)
        self._persist([*self.links.values(), link])
        self.links[config.name] = link
        return link

    def remove(self, name: str) -> Link:
        link = self.links.get(name)
        if link is None:
            known = ", ".join(self.links) or "none"
            raise APIError(404, f'No link named "{shorten(name)}". Links: {known}',
                           param="name", code="link_not_found")
        self._persist([other for other in self.links.values() if other is not link])
        del self.links[name]
        return link

    def _persist(self, links: list[Link]) -> None:
        """Saved before the change takes effect: what runs is always what is on disk."""
        try:
            self._save([link.config for link in links])
        except OSError as exc:
            raise APIError(500, f"Could not save the links: {exc}", type_="server_error",
                           code="links_not_saved") from exc

    # -- listings -------------------------------------------------------------------------

    async def refresh(self, names: list[str] | None = None) -> None:
        """Ask the links (all, or ``names``) for their models, all at once, each within
        ``LIST_TIMEOUT_S``."""
        chosen = [link for name, link in self.links.items() if names is None or name in names]
        await asyncio.gather(*(self._refresh_one(link) for link in chosen))

    async def _refresh_one(self, link: Link) -> None:
        try:
            response = await self.http.get(f"{link.url}/models", headers=link.headers(),
                                           timeout=LIST_TIMEOUT_S)
            models = parse_listing(response)
        except (httpx.HTTPError, ListingError) as exc:
            link.reachable, link.error = False, describe(exc)
        else:
            link.models, link.listed, link.reachable, link.error = models, True, True, None
            link.down_until = 0.0
        link.checked_at = time.time()

    def linked_models(self) -> list[LinkedModel]:
        """Every model some link offers (its last listing), one entry per key."""
        by_key: dict[str, list[Link]] = {}
        contexts: dict[str, int | None] = {}
        for link in self.links.values():
            for model in link.models:
                by_key.setdefault(model.id, []).append(link)
                contexts[model.id] = contexts.get(model.id) or model.context_length
        local = self.local_names() if by_key else set()
        out = []
        for key, links in sorted(by_key.items()):
            identifier = f"{links[0].name}/{key}" if key.lower() in local else key
            out.append(LinkedModel(key, links, contexts[key], identifier))
        return out

    def reachable_models(self) -> list[LinkedModel]:
        return [m for m in self.linked_models() if m.status != "unreachable"]

    # -- requests -------------------------------------------------------------------------

    def resolve(self, name: str) -> LinkTarget | None:
        """The links a request for ``name`` goes to, or None for a local model (or for
        nothing at all: the local handler then says what exists). Never waits."""
        if not self.links or self.is_loaded(name):
            return None
        prefix, _, rest = name.partition("/")
        link = self.links.get(prefix)
        if link is not None and rest and (not link.listed or rest in link.model_ids()):
            return LinkTarget(rest, [link], name)
        if self.is_downloaded(name):
            return None
        replicas = [link for link in self.links.values() if name in link.model_ids()]
        if replicas:
            return LinkTarget(name, replicas, name)
        if link is not None and rest:
            offered = ", ".join(sorted(link.model_ids())[:20]) or "none"
            raise APIError(404, f'The link "{link.name}" does not offer a model '
                           f'"{shorten(rest)}". It offers: {offered}', param="model",
                           code="model_not_found")
        return None

    def linked_model(self, target: LinkTarget) -> LinkedModel:
        context = next((m.context_length for link in target.links for m in link.models
                        if m.id == target.model), None)
        return LinkedModel(target.model, target.links, context, target.identifier)

    @staticmethod
    def ordered(links: list[Link]) -> list[Link]:
        """Replicas in the order to try them: up before down, then fewest in flight, then
        the one used longest ago (so that idle replicas take turns)."""
        now = time.monotonic()
        return sorted(links, key=lambda link: (link.down(now), link.in_flight,
                                               link.last_used))


class ListingError(Exception):
    pass


def parse_listing(response: httpx.Response) -> list[UpstreamModel]:
    """An OpenAI ``/models`` answer; vLLM adds ``max_model_len``, which becomes the context."""
    if response.status_code != 200:
        raise ListingError(f"HTTP {response.status_code} from {response.request.url}: "
                           f"{error_text(response.content, response.reason_phrase)}")
    try:
        items = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise ListingError("its /models answer is not an OpenAI model list") from None
    if not isinstance(items, list):
        raise ListingError("its /models answer is not an OpenAI model list")
    out = []
    for item in items[:MAX_MODELS]:
        model_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(model_id, str) and model_id and model_id.isprintable() \
                and len(model_id) <= 512:
            context = item.get("max_model_len") or item.get("context_length")
            ok = isinstance(context, int) and not isinstance(context, bool) and context > 0
            out.append(UpstreamModel(model_id, context if ok else None))
    return out


def error_text(content: bytes, fallback: str) -> str:
    """The message in an upstream's error body (OpenAI's shape or FastAPI's ``detail``)."""
    text = content.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
        message = err.get("message", err) if isinstance(err, dict) else err
        text = message if isinstance(message, str) else json.dumps(message)
    except ValueError:
        pass
    return shorten(text.strip() or fallback, MAX_ERROR_CHARS)


def describe(exc: Exception) -> str:
    """A transport failure in a few words (these end up in tables and 502 bodies)."""
    if isinstance(exc, ListingError):
        return str(exc)
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return "no answer to the connection attempt in time"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({shorten(str(exc) or 'refused', MAX_ERROR_CHARS)})"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out waiting for an answer"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "the engine closed the connection before answering"
    return shorten(f"{type(exc).__name__}: {exc}", MAX_ERROR_CHARS)
