"""The ASGI application: the one route table (each route with its API family), error
bodies, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import Scope

from lmscli.engine import Engine
from lmscli.logbus import LogBus
from lmscli.logbus.events import RuntimeLog
from lmscli.server import logs_http
from lmscli.server.apis import (
    anthropic_api,
    api_v1,
    api_v1_downloads,
    native,
    ollama_api,
    openai_api,
    responses_api,
)
from lmscli.server.errors import ANTHROPIC, OLLAMA, OPENAI, REST_V1, APIError, Surface
from lmscli.server.links.linked import Linked
from lmscli.server.models import ModelManager
from lmscli.server.sdk import routes as sdk_routes
from lmscli.server.security import GuardMiddleware
from lmscli.server.state import AppState, Settings

log = logging.getLogger("lmscli.server")


# a path no route serves answers in the body of the family whose paths it extends
# (an Anthropic client asking for /v1/messages/batches parses only Anthropic's errors)
# (the first prefix that fits wins: Ollama's /api/ holds LM Studio's /api/v0 and /api/v1)
UNROUTED = (("/v1/messages/", ANTHROPIC), ("/api/v1/", REST_V1), ("/api/v0/", OPENAI),
            ("/api/", OLLAMA))


class ApiRoute(Route):
    """A route, and the API family whose error body its clients parse."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, surface: Surface = OPENAI,
                 methods: list[str] | None = None) -> None:
        super().__init__(path, endpoint, methods=methods)
        self.surface = surface


def surface_of(scope: Scope) -> Surface:
    """The API family of the route a request reached (or will reach: the guard answers before
    routing); for a path no route serves, that of the paths it extends, else OpenAI's."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(scope.get("app"), "routes", []):
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    if route is not None:
        return getattr(route, "surface", OPENAI)
    path = scope.get("path", "")
    return next((surface for prefix, surface in UNROUTED if path.startswith(prefix)), OPENAI)


def error_body(scope: Scope, error: APIError) -> dict[str, Any]:
    return surface_of(scope).error_body(error)


def refused(request: Request, status: int, message: str) -> None:
    """One log line for each request the server refuses: what a client sent wrong, in the
    server's own log, where an agent's user looks first."""
    log.info("%s %s -> %d: %s", request.method, request.url.path, status, message[:300])


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    refused(request, exc.status, exc.message)
    return JSONResponse(error_body(request.scope, exc), status_code=exc.status,
                        headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unexpected endpoint or method. ({request.method} {request.url.path})"
    else:
        message = str(exc.detail)
    refused(request, exc.status_code, message)
    body = error_body(request.scope, APIError(exc.status_code, message))
    return JSONResponse(body, status_code=exc.status_code)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("Unhandled error on %s %s", request.method, request.url.path)
    body = error_body(request.scope, APIError(
        500, f"Internal server error: {type(exc).__name__}: {exc}", type_="server_error"))
    return JSONResponse(body, status_code=500)


def routes() -> list[Route]:
    o, n = openai_api, native
    return [
        Route("/", n.root),  # GET and HEAD: clients probe it (Claude Code, Ollama's)
        Route("/lmstudio-greeting", n.greeting),
        Route("/lms-status", n.lms_status),
        Route("/v1/models", o.v1_models),
        Route("/v1/chat/completions", o.chat_completions, methods=["POST"]),
        Route("/v1/completions", o.completions, methods=["POST"]),
        Route("/v1/embeddings", o.embeddings, methods=["POST"]),
        Route("/v1/responses", responses_api.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses_api.one, methods=["GET", "DELETE"]),
        ApiRoute("/v1/messages", anthropic_api.messages, surface=ANTHROPIC, methods=["POST"]),
        ApiRoute("/v1/messages/count_tokens", anthropic_api.count_tokens_route,
                 surface=ANTHROPIC, methods=["POST"]),
        Route("/api/v0/models", o.v0_models),
        Route("/api/v0/models/{model:path}", o.v0_model_one),
        Route("/api/v0/chat/completions", partial(o.chat_completions, rest=True),
              methods=["POST"]),
        Route("/api/v0/completions", partial(o.completions, rest=True), methods=["POST"]),
        Route("/api/v0/embeddings", o.embeddings, methods=["POST"]),
        Route("/lmscli/status", n.status),
        Route("/lmscli/models/downloaded", n.downloaded),
        Route("/lmscli/models/loaded", n.loaded),
        Route("/lmscli/models/load", n.load, methods=["POST"]),
        Route("/lmscli/models/unload", n.unload, methods=["POST"]),
        Route("/lmscli/shutdown", n.shutdown, methods=["POST"]),
        Route("/lmscli/predict", n.predict, methods=["POST"]),
        Route("/lmscli/predict/{prediction_id}/cancel", n.cancel, methods=["POST"]),
        Route("/lmscli/links", n.list_links),
        Route("/lmscli/links", n.add_link, methods=["POST"]),
        Route("/lmscli/links/remove", n.remove_link, methods=["POST"]),
        Route(logs_http.STREAM_PATH, logs_http.stream),
        *v1_routes(),
        *ollama_routes(),
    ]


def v1_routes() -> list[Route]:
    """LM Studio's REST API v1."""
    v, d = api_v1, api_v1_downloads
    on = partial(ApiRoute, surface=REST_V1)
    return [
        on("/api/v1/chat", v.chat, methods=["POST"]),
        on("/api/v1/models", v.models_list),
        on("/api/v1/models/load", v.models_load, methods=["POST"]),
        on("/api/v1/models/unload", v.models_unload, methods=["POST"]),
        on("/api/v1/models/download", d.download, methods=["POST"]),
        on("/api/v1/models/download/status/{job_id}", d.download_status),
    ]


def ollama_routes() -> list[Route]:
    """Ollama's API, beside LM Studio's /api/v0 and /api/v1."""
    o = ollama_api
    on = partial(ApiRoute, surface=OLLAMA)
    return [
        on("/api/version", o.version, methods=["GET", "HEAD"]),
        on("/api/tags", o.tags, methods=["GET", "HEAD"]),
        on("/api/ps", o.ps),
        on("/api/show", o.show, methods=["POST"]),
        on("/api/chat", o.chat, methods=["POST"]),
        on("/api/generate", o.generate, methods=["POST"]),
        on("/api/embed", o.embed_route, methods=["POST"]),
        on("/api/embeddings", o.embeddings, methods=["POST"]),
        on("/api/pull", o.pull, methods=["POST"]),
        on("/api/delete", o.delete, methods=["DELETE"]),
    ]


def websocket_routes() -> list[WebSocketRoute]:
    """LM Studio's SDK protocol: one websocket path per namespace."""
    return [WebSocketRoute(f"/{name}", partial(sdk_routes.serve, namespace))
            for name, namespace in sdk_routes.namespaces().items()]


def create_app(engine: Engine, settings: Settings | None = None,
               uvicorn_server: Any = None) -> Starlette:
    settings = settings or Settings()
    engine.prompt_cache = settings.prompt_cache()
    logs = LogBus()
    models = ModelManager(engine, on_event=RuntimeLog(logs, engine, log), bus=logs,
                          parallel=settings.parallel, max_queue=settings.max_queue)
    linked = Linked(models, logs, settings.link_refresh_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(models.reaper(settings.reap_every_s))
        linked.start()
        try:
            yield
        finally:
            reaper.cancel()
            await linked.close()
            await models.unload_all()  # cancels running predictions first
            for part in app.state.server.parts.values():  # what API modules keep running
                if hasattr(part, "aclose"):
                    await part.aclose()

    # outermost, so that its duration and status cover everything the client saw
    middleware = [Middleware(logs_http.RequestLogMiddleware, bus=logs)]
    if settings.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                                     allow_headers=["*"]))
    # inside CORS, so that preflights pass and a page can read why it was refused
    middleware.append(Middleware(GuardMiddleware, guard=settings.guard(),
                                 error_body=error_body))
    app = Starlette(
        routes=[*routes(), *websocket_routes()], middleware=middleware,
        lifespan=lifespan,
        exception_handlers={APIError: api_error, HTTPException: http_error,
                            Exception: internal_error},
    )
    app.state.server = AppState(settings, engine, models, logs, linked, uvicorn_server)
    return app
