"""Linked engines as the handlers see them: which names a link serves (``Linked.target``:
every handler asks once, and forwards or translates when it gets a target), the forwarder,
agent API turns on an engine, and what listings show of linked models.

A local model keeps its key: a linked model with the same key is reachable as ``LINK/key``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.requests import Request

from lmscli import catalog, linkstore
from lmscli.engine import SamplingParams
from lmscli.logbus import LogBus
from lmscli.server.errors import APIError
from lmscli.server.links.forward import Forwarder, http_client
from lmscli.server.links.registry import REFRESH_EVERY_S, LinkedModel, Links, LinkTarget
from lmscli.server.links.turn import LinkedTurn, chat_payload
from lmscli.server.models import MAX_NAME_CHARS, ModelManager
from lmscli.server.pipeline.turns import AnyTurn, TurnInput

DOWNLOADED_TTL_S = 2.0
CHARS_PER_TOKEN = 4


class Linked:
    """The registry and the forwarder, for one app."""

    def __init__(self, models: ModelManager, bus: LogBus | None,
                 refresh_every_s: float = REFRESH_EVERY_S) -> None:
        self.models = models
        self.http = http_client()
        self.links = Links(linkstore.load(), self.http, is_loaded=self._is_loaded,
                           is_downloaded=self._is_downloaded, local_names=self._local_names)
        self.forwarder = Forwarder(self.links, bus)
        self.refresh_every_s = refresh_every_s
        self._scanned: set[str] = set()
        self._scanned_at = float("-inf")

    def _is_loaded(self, name: str) -> bool:
        return self.models.find_loaded(name) is not None

    def _is_downloaded(self, name: str) -> bool:
        return len(name) <= MAX_NAME_CHARS and name.lower() in self._downloaded()

    def _downloaded(self) -> set[str]:
        """The keys and paths of the models on disk, lowercased, read at most every
        ``DOWNLOADED_TTL_S``: a scan of the models folder costs milliseconds, and every
        request for a linked model asks (a model downloaded meanwhile wins its key a moment
        later)."""
        now = time.monotonic()
        if now - self._scanned_at > DOWNLOADED_TTL_S:
            self._scanned = {name.lower() for m in catalog.list_models()
                             for name in (m.model_key, m.path)}
            self._scanned_at = now
        return self._scanned

    def _local_names(self) -> set[str]:
        """Every name a local model answers to (as find_loaded and find_model match them)."""
        names = set()
        for entry in self.models.loaded.values():
            names |= {entry.identifier, entry.model.model_key, entry.model.path}
        return {name.lower() for name in names} | self._downloaded()

    def start(self) -> None:
        self.links.start(self.refresh_every_s)

    async def close(self) -> None:
        await self.links.close()
        await self.http.aclose()

    async def open_turn(self, request: Request, name: Any, wanted: TurnInput,
                        params: SamplingParams, call_id_prefix: str = "call_"
                        ) -> tuple[str, AnyTurn] | None:
        """An agent API turn (Responses, Messages, v1 chat) on the linked engine that serves
        the request's model, started; None when the model is not a linked one."""
        target = self.target(name)
        if target is None:
            return None
        turn = LinkedTurn(request, self.forwarder, target,
                          chat_payload(target, wanted, params), call_id_prefix)
        await turn.start()
        return target.identifier, turn

    def target(self, name: Any) -> LinkTarget | None:
        """The link target serving the model called ``name``; None for a local model (or
        none at all: the local handler then says what is wrong)."""
        if not self.links.links or not isinstance(name, str) or not name:
            return None
        return self.links.resolve(name)

    def model(self, target: LinkTarget) -> LinkedModel:
        return self.links.linked_model(target)

    def check_unload(self, name: str) -> None:
        """A 400 for an unload of a name that a link serves: nothing is loaded here."""
        if self.models.find_loaded(name) is not None:
            return
        model = next((m for m in self.links.linked_models() if name in m.aliases()), None)
        if model is not None:
            raise APIError(400, f'"{name}" is served by the link {model.device}: nothing is '
                           f"loaded here. To stop using it, remove the link: lms link rm "
                           f"{model.links[0].name}", param="identifier",
                           code="model_is_linked")


def estimate_tokens(wanted: TurnInput) -> int:
    """About four characters a token: chat upstreams have no way to count a prompt without
    running it, and clients use the count to budget, not to bill."""
    text = json.dumps([wanted.messages, wanted.tools, wanted.prefill], ensure_ascii=False)
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def v1_entry(model: LinkedModel) -> dict[str, Any]:
    return {"id": model.identifier, "object": "model", "owned_by": model.device}


def v0_entry(model: LinkedModel) -> dict[str, Any]:
    return {"id": model.identifier, "object": "model", "type": "llm",
            "publisher": model.links[0].name, "arch": None, "compatibility_type": "linked",
            "quantization": None, "state": "loaded",
            "max_context_length": model.context_length,
            "links": [link.name for link in model.links]}
