"""Where linked engines meet the routes: ``lms link``'s endpoints, and wrappers around the
existing handlers that forward a request when its model is a linked one and otherwise call
the local handler unchanged (Starlette caches the body, so reading it twice is free).

``Linked.wrap`` is applied to the whole route table, so the local handlers know nothing of
links and new routes need no change here unless they should forward too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from lmscli import catalog, linkstore
from lmscli.engine import SamplingParams
from lmscli.logbus import LogBus
from lmscli.server import anthropic_api, link_sdk
from lmscli.server.errors import APIError, Body, bad_request, parse_json
from lmscli.server.forward import Forwarder, http_client
from lmscli.server.link_turn import LinkedTurn, chat_payload
from lmscli.server.links import REFRESH_EVERY_S, LinkedModel, Links, Target
from lmscli.server.models import MAX_NAME_CHARS, ModelManager
from lmscli.server.turns import AnyTurn, TurnInput

Handler = Callable[[Request], Awaitable[Any]]
DOWNLOADED_TTL_S = 2.0
CHARS_PER_TOKEN = 4


class Linked:
    """The registry, the forwarder and the SDK predictions in flight, for one app."""

    def __init__(self, models: ModelManager, bus: LogBus | None,
                 refresh_every_s: float = REFRESH_EVERY_S) -> None:
        self.models = models
        self.http = http_client()
        self.links = Links(linkstore.load(), self.http, is_loaded=self._is_loaded,
                           is_downloaded=self._is_downloaded, local_names=self._local_names)
        self.forwarder = Forwarder(self.links, bus)
        self.predictions: dict[str, link_sdk.LinkedPrediction] = {}
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

    async def target_of(self, request: Request) -> tuple[Target | None, Body | None]:
        """The link target of the request's ``model``; (None, None) when it is not linked
        or the body is not even JSON (the local handler then says what is wrong)."""
        if not self.links.links:
            return None, None
        try:
            data = json.loads(await request.body())
        except (ValueError, RecursionError):
            return None, None
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            return None, None
        target = self.links.resolve(name)
        return (target, Body(data)) if target else (None, None)

    async def open_turn(self, request: Request, wanted: TurnInput, params: SamplingParams,
                        call_id_prefix: str) -> tuple[str, AnyTurn] | None:
        """An agent API turn (Responses, Messages, v1 chat) on the linked engine that serves
        the request's model, started; None when the model is not a linked one."""
        target, _ = await self.target_of(request)
        if target is None:
            return None
        turn = LinkedTurn(request, self.forwarder, target,
                          chat_payload(target, wanted, params), call_id_prefix)
        await turn.start()
        return target.identifier, turn

    # -- wrapping the route table ---------------------------------------------------------

    def wrap(self, routes: list[BaseRoute]) -> list[BaseRoute]:
        wrappers: dict[str, Callable[[Handler], Handler]] = {
            "/v1/chat/completions": self._forwarding("/chat/completions"),
            "/api/v0/chat/completions": self._forwarding("/chat/completions"),
            "/v1/completions": self._forwarding("/completions"),
            "/api/v0/completions": self._forwarding("/completions"),
            "/v1/embeddings": self._forwarding("/embeddings"),
            "/api/v0/embeddings": self._forwarding("/embeddings"),
            "/v1/models": self._listing(v1_entry),
            "/api/v0/models": self._listing(v0_entry),
            "/api/v0/models/{model:path}": self._one_v0,
            "/lmscli/models/loaded": self._loaded,
            "/lmscli/models/load": self._load,
            "/lmscli/models/unload": self._unload,
            "/lmscli/predict": self._predict,
            "/v1/messages/count_tokens": self._count_tokens,
            "/lmscli/predict/{prediction_id}/cancel": self._cancel,
        }
        out: list[BaseRoute] = []
        for route in routes:
            wrap = wrappers.get(getattr(route, "path", ""))
            if isinstance(route, Route) and wrap is not None:
                route = Route(route.path, wrap(route.endpoint), methods=route.methods)
            out.append(route)
        return out + [
            Route("/lmscli/links", list_links),
            Route("/lmscli/links", add_link, methods=["POST"]),
            Route("/lmscli/links/remove", remove_link, methods=["POST"]),
        ]

    def _forwarding(self, path: str) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Any:
                target, body = await self.target_of(request)
                if target is None or body is None:
                    return await handler(request)
                return await self.forwarder.openai(request, body, target, path)

            return endpoint

        return wrap

    def _listing(self, entry: Callable[[LinkedModel], dict[str, Any]]
                 ) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Any:
                return add_entries(await handler(request),
                                   [entry(m) for m in self.links.reachable_models()])

            return endpoint

        return wrap

    def _one_v0(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            target = self.links.resolve(request.path_params["model"])
            if target is None:
                return await handler(request)
            return JSONResponse(v0_entry(self.links.linked_model(target)))

        return endpoint

    def _loaded(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            # after the local ones: "the first loaded model" stays a local one
            return add_entries(await handler(request),
                               [m.info() for m in self.links.linked_models()])

        return endpoint

    def _load(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            target, _ = await self.target_of(request)
            if target is None:
                return await handler(request)
            return link_sdk.load_answer(self.links.linked_model(target))

        return endpoint

    def _unload(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            data = parse_json(await request.body())
            name = data.get("identifier") if isinstance(data, dict) else None
            model = self._linked_by_alias(name) if isinstance(name, str) else None
            if model is None:
                return await handler(request)
            raise APIError(400, f'"{name}" is served by the link {model.device}: nothing is '
                           f"loaded here. To stop using it, remove the link: lms link rm "
                           f"{model.links[0].name}", param="identifier",
                           code="model_is_linked")

        return endpoint

    def _linked_by_alias(self, name: str) -> LinkedModel | None:
        if self.models.find_loaded(name) is not None:
            return None
        return next((m for m in self.links.linked_models() if name in m.aliases()), None)

    def _predict(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            target, body = await self.target_of(request)
            if target is None or body is None:
                return await handler(request)
            return await link_sdk.predict(request, body, target,
                                          self.links.linked_model(target), self.forwarder,
                                          self.predictions)

        return endpoint

    def _count_tokens(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            target, body = await self.target_of(request)
            if target is None or body is None:
                return await handler(request)
            wanted = anthropic_api.turn_input(body)  # the same checks as for a local model
            return JSONResponse({"input_tokens": estimate_tokens(wanted)})

        return endpoint

    def _cancel(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Any:
            prediction = self.predictions.get(request.path_params["prediction_id"])
            if prediction is None:
                return await handler(request)
            prediction.cancel()
            return JSONResponse({"cancelled": True})

        return endpoint


def estimate_tokens(wanted: TurnInput) -> int:
    """About four characters a token: chat upstreams have no way to count a prompt without
    running it, and clients use the count to budget, not to bill."""
    text = json.dumps([wanted.messages, wanted.tools, wanted.prefill], ensure_ascii=False)
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def add_entries(response: Response, entries: list[dict[str, Any]]) -> Response:
    """A local listing (a JSON list, or OpenAI's ``{"data": [...]}``) with ``entries``
    after its own."""
    if not entries or response.status_code != 200:
        return response
    data = json.loads(bytes(response.body))
    if isinstance(data, dict):
        data["data"] = [*data.get("data", []), *entries]
    else:
        data = [*data, *entries]
    return JSONResponse(data)


def v1_entry(model: LinkedModel) -> dict[str, Any]:
    return {"id": model.identifier, "object": "model", "owned_by": model.device}


def v0_entry(model: LinkedModel) -> dict[str, Any]:
    return {"id": model.identifier, "object": "model", "type": "llm",
            "publisher": model.links[0].name, "arch": None, "compatibility_type": "linked",
            "quantization": None, "state": "loaded",
            "max_context_length": model.context_length,
            "links": [link.name for link in model.links]}


# -- `lms link` -------------------------------------------------------------------------------

def linked(request: Request) -> Linked:
    return request.app.state.linked


async def list_links(request: Request) -> Any:
    """The links; ``?refresh=true`` asks each for its models first (a few seconds at most)."""
    registry = linked(request).links
    if request.query_params.get("refresh", "").lower() in ("1", "true", "yes"):
        await registry.refresh()
    return JSONResponse({"links": [link.info() for link in registry.links.values()]})


async def add_link(request: Request) -> Any:
    body = Body(parse_json(await request.body()))
    name = body.text("name", required=True)
    url = body.text("url", required=True)
    key = body.text("api_key")
    config = linkstore.LinkConfig(checked(linkstore.check_name, name, "name"),
                                  checked(linkstore.normalise_url, url, "url"), key or None)
    registry = linked(request).links
    link = registry.add(config)
    await registry.refresh([link.name])
    return JSONResponse({"link": link.info()})


def checked(check: Callable[[str], str], value: str, param: str) -> str:
    try:
        return check(value)
    except linkstore.LinkConfigError as exc:
        raise bad_request(str(exc), param, "invalid_link") from None


async def remove_link(request: Request) -> Any:
    body = Body(parse_json(await request.body()))
    link = linked(request).links.remove(body.text("name", required=True))
    return JSONResponse({"removed": link.name})
