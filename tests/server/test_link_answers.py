"""What a caller gets when a linked engine answers badly: a loopback engine (a tiny Starlette
app) that lists models whose names say how it misbehaves (a proxy's HTML page, plain text, a
stream to everything, an error with a 200, a 500, a 503). Every route, relayed or translated,
follows one rule: an error status is passed on with the engine's message, a reply that is not
the API's shape is a 502 naming the link, each in the caller's API's error body, and a
request for a whole answer never receives a stream."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import lmstudio
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.conftest import ThreadServer, free_port, wait_for
from tests.server.test_links import (  # noqa: F401  (fixtures)
    fresh_clients,
    front,
    lms_cli,
)

CHUNK = {"id": "c1", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
WHOLE = {"id": "c1", "object": "chat.completion", "choices": [{
    "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
SSE = f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n"


def sse(text: str) -> Response:
    return Response(text, media_type="text/event-stream")


# each model's answer to every POST, whatever was asked
BEHAVIOURS: dict[str, Callable[[], Response]] = {
    "html": lambda: HTMLResponse("<html><body>Please sign in to the proxy</body></html>"),
    "text": lambda: PlainTextResponse("hello, I am not an API"),
    "streams": lambda: sse(SSE),  # even to a request for a whole answer
    "whole": lambda: JSONResponse(WHOLE),  # even to a request for a stream
    "error-200": lambda: JSONResponse({"error": {"message": "the model crashed"}}),
    "junk-events": lambda: sse(": keep-alive\n\ndata: not json\n\n"),
    "boom": lambda: JSONResponse({"error": {"message": "CUDA error: out of memory"}},
                                 status_code=500),
    "busy": lambda: JSONResponse({"detail": "engine overloaded"}, status_code=503,
                                 headers={"Retry-After": "7"}),
    "locked": lambda: JSONResponse({"error": {"message": "Invalid API key"}}, status_code=401),
}


class BadEngine:
    """An OpenAI-compatible engine on loopback that lists ``BEHAVIOURS`` and answers each
    model's requests as its behaviour says."""

    def __init__(self) -> None:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [
                {"id": name, "object": "model"} for name in BEHAVIOURS]})

        async def answer(request: Request) -> Response:
            return BEHAVIOURS[(await request.json())["model"]]()

        app = Starlette(routes=[Route("/v1/models", models), *(
            Route(f"/v1/{path}", answer, methods=["POST"])
            for path in ("chat/completions", "completions", "embeddings"))])
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(self.base_url + "/v1/models")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def linked(front: ThreadServer,  # noqa: F811
           capsys: pytest.CaptureFixture[str]) -> Iterator[ThreadServer]:
    engine = BadEngine()
    code, _, err = lms_cli(capsys, "link", "add", "bad", engine.base_url)
    assert code == 0, err
    yield front
    engine.stop()


def post(server: ThreadServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=10)


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


RELAYED = [("/v1/chat/completions", lambda m: chat_body(m)),
           ("/v1/completions", lambda m: {"model": m, "prompt": "hi"}),
           ("/v1/embeddings", lambda m: {"model": m, "input": "hi"}),
           ("/api/v0/chat/completions", lambda m: chat_body(m))]


# -- relayed routes: the engine's bytes pass through only when they are the API's shape ------

@pytest.mark.parametrize("model", ["html", "text", "streams", "error-200"])
def test_a_junk_answer_to_a_relayed_request_is_a_502(linked: ThreadServer, model: str) -> None:
    for path, body in RELAYED:
        r = post(linked, path, body(f"bad/{model}"))
        assert r.status_code == 502, (path, r.text)
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["message"].startswith("The linked engine bad "), error
        assert not r.text.startswith("data:")
    message = post(linked, "/v1/chat/completions", chat_body("bad/html")).json()["error"]
    assert message["code"] == "upstream_bad_answer"
    assert message["message"] == (
        'The linked engine bad did not answer with a chat completion; it sent HTTP 200 '
        '(text/html; charset=utf-8): "<html><body>Please sign in to the proxy</body></html>"')
    crashed = post(linked, "/v1/chat/completions", chat_body("bad/error-200")).json()["error"]
    assert crashed["message"] == "The linked engine bad failed: the model crashed"


def test_a_stream_goes_only_to_a_request_for_one(linked: ThreadServer) -> None:
    """The OpenAI SDK reads a whole answer as JSON: a stream it did not ask for must not
    reach it, nor a whole answer reach a streaming client."""
    client = openai.OpenAI(base_url=linked.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**chat_body("bad/streams"))
    assert caught.value.status_code == 502
    assert "did not answer with a chat completion" in caught.value.message
    streamed = client.chat.completions.create(**chat_body("bad/streams"), stream=True)
    assert [c.choices[0].delta.content for c in streamed] == ["hi"]
    for model in ("whole", "text", "junk-events"):
        r = post(linked, "/v1/chat/completions", chat_body(f"bad/{model}", stream=True))
        if model == "junk-events":  # an event stream: what it holds is out by then
            assert r.status_code == 200
            continue
        assert r.status_code == 502 and r.headers["content-type"] == "application/json"
        assert "did not answer with a chat completion stream" in r.json()["error"]["message"]
    whole = client.chat.completions.create(**chat_body("bad/whole"))
    assert whole.choices[0].message.content == "hi"


def test_an_engine_error_status_is_passed_on_in_the_callers_shape(
        linked: ThreadServer) -> None:
    for path, body in RELAYED:
        r = post(linked, path, body("bad/boom"))
        assert r.status_code == 500, path
        assert r.json() == {"error": {
            "message": "The linked engine bad failed (HTTP 500): CUDA error: out of memory",
            "type": "server_error", "param": None, "code": "upstream_error"}}
    busy = post(linked, "/v1/chat/completions", chat_body("bad/busy", stream=True))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    assert busy.json()["error"]["message"] == \
        "The linked engine bad failed (HTTP 503): engine overloaded"


def test_an_engine_refusing_the_links_key_is_a_502(linked: ThreadServer) -> None:
    """The link's key is wrong, not the caller's: passed on as a 401, the caller's SDK would
    say its own key is."""
    for path, body in RELAYED:
        r = post(linked, path, body("bad/locked"))
        assert r.status_code == 502, path
        message = r.json()["error"]["message"]
        assert "refused this server's key (HTTP 401" in message and "Invalid API key" in message


# -- translated routes: the agent APIs and the lmstudio SDK ----------------------------------

def agent_errors(server: ThreadServer, model: str) -> list[tuple[int, str, str]]:
    """Each agent API's status, error message and error type for ``model``, whole and
    streamed, as its own SDK (or, for /api/v1/chat, a plain client) sees them."""
    oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    seen = []
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as oai_error:
            list(oai.responses.create(model=model, input="hi", stream=True)) if stream \
                else oai.responses.create(model=model, input="hi")
        error = oai_error.value.body
        assert isinstance(error, dict)
        seen.append((oai_error.value.status_code, error["message"], error["type"]))
        with pytest.raises(anthropic.APIStatusError) as claude_error:
            kw: dict[str, Any] = {"model": model, "max_tokens": 10,
                                  "messages": [{"role": "user", "content": "hi"}]}
            list(claude.messages.create(**kw, stream=True)) if stream \
                else claude.messages.create(**kw)
        body = claude_error.value.body
        assert isinstance(body, dict) and body["type"] == "error"
        seen.append((claude_error.value.status_code, body["error"]["message"],
                     body["error"]["type"]))
        r = post(server, "/api/v1/chat", {"model": model, "input": "hi", "stream": stream})
        seen.append((r.status_code, r.json()["error"]["message"], r.json()["error"]["type"]))
    return seen


@pytest.mark.parametrize("model", ["html", "text", "whole", "error-200"])
def test_a_junk_answer_to_an_agent_api_is_a_502(linked: ThreadServer, model: str) -> None:
    for status, message, kind in agent_errors(linked, f"bad/{model}"):
        assert status == 502 and message.startswith("The linked engine bad "), message
        assert kind in ("server_error", "api_error", "internal_error")


def test_an_agent_api_turn_on_junk_events_fails(linked: ThreadServer) -> None:
    """An event stream that holds no completion chunk is no empty success either."""
    r = post(linked, "/v1/responses", {"model": "bad/junk-events", "input": "hi"})
    assert r.status_code == 502
    assert r.json()["error"]["message"] == \
        "The linked engine bad ended its stream without a completion chunk."


def test_an_engine_error_status_reaches_every_agent_api(linked: ThreadServer) -> None:
    for status, message, kind in agent_errors(linked, "bad/boom"):
        assert status == 500, message
        assert message == "The linked engine bad failed (HTTP 500): CUDA error: out of memory"
        assert kind in ("server_error", "api_error", "internal_error")


def test_the_lmstudio_sdk_gets_the_engines_failure(linked: ThreadServer) -> None:
    with lmstudio.Client(f"127.0.0.1:{linked.port}") as client:
        model = client.llm.model("bad/boom")
        with pytest.raises(lmstudio.LMStudioServerError, match="CUDA error: out of memory"):
            model.respond("hi")
        with pytest.raises(lmstudio.LMStudioServerError, match="did not answer with a chat"):
            client.llm.model("bad/html").respond("hi")
