"""Linked engines against real servers: a front lmscli server (a thread) linked to other lmscli
servers (processes with their own homes), all on the fake engine, so that every behaviour a
user sees (commands, listings, forwarding, streams, tools, replicas, logs, the SDK) is
checked in seconds. The real model and llama-cpp-python's own server: test_links_real.py."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import lmscli as lms
from lmscli import paths
from lmscli.cli import connect
from lmscli.cli.app import run
from lmscli.client import default
from lmscli.engine.fake import FakeEngine
from lmscli.server.links import linked as linked_module
from tests.cli.test_chat import repl
from tests.conftest import ProcessServer, ThreadServer, prediction_logs
from tests.gguf_factory import make_gguf

SAY_HELLO = {"type": "function", "function": {
    "name": "say_hello", "description": "Says hello to someone",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}
CALL = '[TOOL_REQUEST]{"name": "say_hello", "arguments": {"name": "Bob"}}[END_TOOL_REQUEST]'

Engines = Callable[..., ProcessServer]


def lms_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def fresh_clients() -> Iterator[None]:
    default.reset_default_client()
    yield
    connect.use(None, None, None)


@pytest.fixture
def engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engines]:
    """Starts lmscli servers on the fake engine, each with its own home holding the models
    named (another machine's server, as far as the front can tell)."""
    started: list[ProcessServer] = []

    def start(name: str, models: tuple[str, ...] = ("tiny-chat",),
              key: str | None = None) -> ProcessServer:
        home = tmp_path / f"engine-{name}"
        home.mkdir()
        for model in models:
            make_gguf(home / f"models/test/{model}-GGUF/{model}.Q4_0.gguf", name=model,
                      context_length=256)
        with monkeypatch.context() as env:
            env.setenv("LMSCLI_ENGINE", "fake")
            if key:
                env.setenv("LMS_API_KEY", key)
            server = ProcessServer(home)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def front(home: Path) -> Iterator[ThreadServer]:
    """The server the user talks to: no models of its own, links refreshed often."""
    server = ThreadServer(FakeEngine(), reap_every_s=0.1, link_refresh_s=0.3)
    yield server
    server.stop()


def link(capsys: pytest.CaptureFixture[str], name: str, engine: ProcessServer,
         *extra: str) -> str:
    code, _, err = lms_cli(capsys, "link", "add", name, engine.base_url, *extra)
    assert code == 0, err
    return err


def links_json(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    code, out, _ = lms_cli(capsys, "link", "ls", "--json")
    assert code == 0
    return {item["name"]: item for item in json.loads(out)}


def sdk(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def chat(server: ThreadServer, content: str, model: str = "tiny-chat", **kw: Any) -> Any:
    return sdk(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw)


def upstream_status(engine: ProcessServer) -> list[str]:
    loaded = httpx.get(engine.base_url + "/lmscli/models/loaded").json()
    return [m["status"] for m in loaded]


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# -- lms link add | ls | rm -------------------------------------------------------------------

def test_add_list_remove_and_their_errors(front: ThreadServer, engines: Engines,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up", models=("tiny-chat", "other-model"))
    err = link(capsys, "up", up)
    assert f"Linked up at {up.base_url}/v1: 2 models (other-model, tiny-chat)." in err
    for args, message in [
        (("up", up.base_url), 'A link named "up" already exists. Remove it first with: '
                              "lms link rm up"),
        (("a/b", up.base_url), "Invalid link name 'a/b'"),
        (("ftp", "ftp://example.com"), "Invalid link URL 'ftp://example.com'"),
        (("creds", "http://user:pw@example.com"), "leave credentials out of it"),
    ]:
        code, out, err = lms_cli(capsys, "link", "add", *args)
        assert code == 1 and out == ""
        assert message in err and len(err.strip().splitlines()) == 1
    code, _, err = lms_cli(capsys, "link", "rm", "nope")
    assert code == 1 and 'No link named "nope". Links: up' in err
    code, out, _ = lms_cli(capsys, "link", "ls")
    assert out.splitlines()[0].split() == ["NAME", "URL", "STATUS", "MODELS"]
    assert out.splitlines()[1].split() == ["up", f"{up.base_url}/v1", "reachable",
                                           "other-model,", "tiny-chat"]
    saved = json.loads(paths.links_file().read_text())
    assert saved == {"links": [{"name": "up", "url": f"{up.base_url}/v1"}]}
    code, _, err = lms_cli(capsys, "link", "rm", "up")
    assert code == 0 and "Removed the link up." in err
    code, _, err = lms_cli(capsys, "link", "ls")
    assert code == 0 and "No engines are linked." in err
    assert json.loads(paths.links_file().read_text()) == {"links": []}
    # the front is still up and answering after every refusal
    assert httpx.get(front.base_url + "/lmstudio-greeting").json() == {"lmstudio": True}


def test_links_survive_a_restart(engines: Engines, home: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up")
    first = ThreadServer(FakeEngine(), link_refresh_s=0.3)
    try:
        link(capsys, "up", up, "--api-key", "k-123")
    finally:
        first.stop()
    second = ThreadServer(FakeEngine(), link_refresh_s=0.3)
    try:
        assert wait_until(lambda: "tiny-chat" in json.dumps(
            httpx.get(second.base_url + "/v1/models").json()))
        assert links_json(capsys)["up"]["hasApiKey"] is True
    finally:
        second.stop()


def test_the_key_is_private_sent_upstream_and_never_shown(
        front: ThreadServer, engines: Engines, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sekrit-upstream-key"
    keyed = engines("keyed", key=secret)
    link(capsys, "keyed", keyed, "--api-key", secret)
    err = lms_cli(capsys, "link", "add", "nokey", keyed.base_url)[2]
    assert "but it does not answer now: HTTP 401" in err
    mode = stat.S_IMODE(os.stat(paths.links_file()).st_mode)
    assert mode == 0o600 and secret in paths.links_file().read_text()
    assert chat(front, "[[reply: through the keyed link]]").choices[0].message.content \
        == "through the keyed link"
    code, out, _ = lms_cli(capsys, "link", "ls")
    assert "nokey" in out and "unreachable" in out and "HTTP 401" in out
    shown = [out, json.dumps(links_json(capsys))]
    for path in ("/v1/models", "/api/v0/models", "/lmscli/models/loaded", "/lmscli/links"):
        shown.append(httpx.get(front.base_url + path).text)
    assert all(secret not in text for text in shown)


# -- listings ---------------------------------------------------------------------------------

def test_linked_models_in_every_listing(front: ThreadServer, engines: Engines,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up")
    link(capsys, "up", up)
    v1 = httpx.get(front.base_url + "/v1/models").json()["data"]
    assert {"id": "tiny-chat", "object": "model", "owned_by": "up"} in v1
    v0 = httpx.get(front.base_url + "/api/v0/models").json()["data"]
    entry = next(m for m in v0 if m["id"] == "tiny-chat")
    assert entry["compatibility_type"] == "linked" and entry["state"] == "loaded"
    one = httpx.get(front.base_url + "/api/v0/models/up/tiny-chat").json()
    assert one["id"] == "up/tiny-chat" and one["links"] == ["up"]
    code, out, _ = lms_cli(capsys, "ps")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[-2:] == ["DEVICE", "TTL"]
    assert row.split() == ["tiny-chat", "tiny-chat", "IDLE", "-", "-", "-", "up"]
    code, out, _ = lms_cli(capsys, "ls")
    row = next(line for line in out.splitlines() if line.startswith("tiny-chat"))
    assert row.split() == ["tiny-chat", "-", "up", "✓", "LINKED"]


def test_a_local_model_keeps_its_key(front: ThreadServer, engines: Engines, home: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(linked_module, "DOWNLOADED_TTL_S", 0.0)  # see the new model at once
    up = engines("up")
    link(capsys, "up", up)
    make_gguf(home / "models/test/tiny-chat-GGUF/tiny-chat.Q4_0.gguf", name="Local",
              context_length=256)
    ids = [m["id"] for m in httpx.get(front.base_url + "/v1/models").json()["data"]]
    assert "tiny-chat" in ids and "up/tiny-chat" in ids
    chat(front, "[[reply: local]]")
    assert list(front.models.loaded) == ["tiny-chat"] and upstream_status(up) == []
    assert chat(front, "[[reply: far]]", model="up/tiny-chat").choices[0].message.content \
        == "far"
    assert upstream_status(up) == ["idle"]


# -- forwarding -------------------------------------------------------------------------------

def test_chat_completions_and_rest_are_forwarded(front: ThreadServer, engines: Engines,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    link(capsys, "up", engines("up"))
    r = chat(front, "[[reply: hello there]]", max_tokens=50)
    assert r.choices[0].message.content == "hello there"
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2
    r = chat(front, "[[count: 9]]", model="up/tiny-chat", max_tokens=3)
    assert r.choices[0].message.content.split() == ["n1", "n2", "n3"]
    assert r.choices[0].finish_reason == "length"
    text = sdk(front).completions.create(model="tiny-chat", prompt="[[reply: done]]")
    assert text.choices[0].text == "done"
    rest = httpx.post(front.base_url + "/api/v0/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "[[reply: v0]]"}]})
    assert rest.json()["choices"][0]["message"]["content"] == "v0"
    bad = httpx.post(front.base_url + "/v1/chat/completions",
                     json={"model": "tiny-chat", "messages": []})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    unknown = httpx.post(front.base_url + "/v1/chat/completions", json={
        "model": "up/nope", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == ('The link "up" does not offer a model '
                                                  '"nope". It offers: tiny-chat')


def test_streams_go_chunk_by_chunk_with_usage(front: ThreadServer, engines: Engines,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    link(capsys, "up", engines("up"))
    arrivals, texts, usage, finish = [], [], None, None
    for chunk in chat(front, "[[slow]] [[count: 8]]", stream=True,
                      stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            texts.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(texts) == "n1 n2 n3 n4 n5 n6 n7 n8" and finish == "stop"
    assert len(texts) >= 6 and arrivals[-1] - arrivals[0] > 0.2  # not buffered to the end
    assert usage is not None and usage.completion_tokens == 8


def test_tool_calls_pass_through(front: ThreadServer, engines: Engines,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    link(capsys, "up", engines("up"))
    r = chat(front, f"[[reply: {CALL}]]", tools=[SAY_HELLO], tool_choice="auto")
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "say_hello" and json.loads(call.function.arguments) == \
        {"name": "Bob"}
    parts, finish = [], None
    for chunk in chat(front, f"[[reply: {CALL}]]", tools=[SAY_HELLO], stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        parts += [c.function.arguments or "" for c in (delta.tool_calls or [])] if delta else []
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert json.loads("".join(parts)) == {"name": "Bob"} and finish == "tool_calls"


def test_a_client_that_leaves_stops_the_upstream(front: ThreadServer, engines: Engines,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up")
    link(capsys, "up", up)
    body = {"model": "tiny-chat", "stream": True,
            "messages": [{"role": "user", "content": "[[slow]] [[count: 400]]"}]}
    with httpx.stream("POST", front.base_url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)]
        assert upstream_status(up) == ["generating"]
    # 400 tokens take 20 s: the upstream stops within moments of the client leaving
    assert wait_until(lambda: upstream_status(up) == ["idle"], timeout=3)
    assert links_json(capsys)["up"]["inFlight"] == 0


# -- replicas ---------------------------------------------------------------------------------

def test_replicas_share_requests_and_take_over(front: ThreadServer, engines: Engines,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b = engines("a"), engines("b")
    link(capsys, "a", a)
    link(capsys, "b", b)
    code, out, _ = lms_cli(capsys, "ps")
    assert out.splitlines()[1].split()[-2:] == ["a,", "b"]  # one model, two replicas
    for i in range(10):
        assert chat(front, f"[[reply: r{i}]]").choices[0].message.content == f"r{i}"
    served = links_json(capsys)
    assert served["a"]["served"] == served["b"]["served"] == 5
    b.stop()
    for i in range(6):
        assert chat(front, f"[[reply: s{i}]]").choices[0].message.content == f"s{i}"
    after = links_json(capsys)
    assert after["b"]["reachable"] is False and after["a"]["served"] == 11
    a.stop()
    r = httpx.post(front.base_url + "/v1/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})
    message = r.json()["error"]["message"]
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert message.startswith('None of the linked engines for "tiny-chat" answered: ')
    assert "a: cannot connect" in message and "b: cannot connect" in message


def test_fewest_in_flight_first(front: ThreadServer, engines: Engines,
                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b = engines("a"), engines("b")
    link(capsys, "a", a)
    link(capsys, "b", b)
    body = {"model": "tiny-chat", "stream": True,
            "messages": [{"role": "user", "content": "[[slow]] [[count: 100]]"}]}
    with httpx.stream("POST", front.base_url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        assert next(lines).startswith("data: ")
        busy = next(name for name, item in links_json(capsys).items() if item["inFlight"])
        for i in range(3):  # while one replica is busy, the other takes every request
            assert chat(front, f"[[reply: q{i}]]").choices[0].message.content == f"q{i}"
        served = links_json(capsys)
    idle = "b" if busy == "a" else "a"
    assert served[busy]["served"] == 1 and served[idle]["served"] == 3


def test_a_ring_of_links_ends_in_a_clear_error(fake_server: ThreadServer, engines: Engines,
                                               home: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Two servers linked to each other, and the model gone from the one that had it: each
    still lists it through the other. The request stops after a few hops with a 508."""
    monkeypatch.setattr(linked_module, "DOWNLOADED_TTL_S", 0.0)  # see the deletion at once
    peer = engines("peer", models=())
    added = httpx.post(peer.base_url + "/lmscli/links",
                       json={"name": "back", "url": fake_server.base_url})
    assert "tiny-chat" in added.json()["link"]["models"]
    link(capsys, "peer", peer)
    for model in (home / "models").rglob("*.gguf"):
        model.unlink()
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 508 and r.json()["error"]["code"] == "link_loop"
    assert "a link points back at a server it came from" in r.json()["error"]["message"]
    assert httpx.get(fake_server.base_url + "/lmstudio-greeting").status_code == 200


# -- never slowing local models ---------------------------------------------------------------

@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers, as a hung engine would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_an_unreachable_link_never_slows_local_models(fake_server: ThreadServer,
                                                      silent_port: int,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    started = time.monotonic()
    code, _, err = lms_cli(capsys, "link", "add", "hung", f"http://127.0.0.1:{silent_port}")
    assert code == 0 and "does not answer now: timed out" in err
    assert time.monotonic() - started < 5
    refresh = threading.Thread(target=lambda: httpx.get(
        fake_server.base_url + "/lmscli/links?refresh=true", timeout=10))
    refresh.start()  # the server now waits on the hung engine for its listing...
    time.sleep(0.1)
    began = time.monotonic()
    httpx.get(fake_server.base_url + "/v1/models").raise_for_status()
    assert chat(fake_server, "[[reply: local]]").choices[0].message.content == "local"
    assert time.monotonic() - began < 1.0  # ...and local models don't
    refresh.join()
    code, out, _ = lms_cli(capsys, "link", "ls")
    assert "hung" in out and "unreachable" in out and "timed out" in out


# -- the log bus ------------------------------------------------------------------------------

def test_log_stream_shows_forwarded_predictions(front: ThreadServer, engines: Engines,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    link(capsys, "up", engines("up"))

    def ask_twice() -> None:
        chat(front, "[[reply: logged answer]]", max_tokens=20)
        list(chat(front, "[[reply: streamed answer]]", stream=True))

    events = prediction_logs(front.base_url, 4, ask_twice)
    given, produced, _, streamed = events
    assert given["type"] == "llm.prediction.input" and given["modelIdentifier"] == "tiny-chat"
    assert json.loads(given["input"]) == [{"role": "user", "content": "[[reply: logged answer]]"}]
    assert given["modelPath"] == "up/tiny-chat"
    assert produced["output"] == "logged answer"
    assert produced["stats"]["stopReason"] == "eosFound"
    assert produced["stats"]["predictedTokensCount"] == 2
    assert produced["stats"]["promptTokensCount"] > 0
    assert streamed["output"] == "streamed answer"


# -- the SDK surface and lms chat -------------------------------------------------------------

def respond_cancel_and_act(client: Any, up: ProcessServer, reply: str) -> None:
    """respond, a cancelled respond_stream and a two-round act on a model of the link ``up``,
    through either SDK's client: lmscli's and the official lmstudio one share this surface."""
    model = client.llm.model("up/tiny-chat")
    assert model.get_info().model_key == "tiny-chat"
    result = model.respond(f"[[reply: {reply}]]")
    assert result.content == reply
    assert result.stats.stop_reason == "eosFound" and result.stats.predicted_tokens_count == 4
    stream = model.respond_stream("[[slow]] [[count: 400]]")
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
    assert stream.result().stats.stop_reason == "userStopped"
    assert wait_until(lambda: upstream_status(up) == ["idle"], timeout=3)
    greeted = []

    def say_hello(name: str) -> str:
        """Says hello to someone"""
        greeted.append(name)
        return f"Hello, {name}!"

    act = client.llm.model("tiny-chat").act(f"[[reply: {CALL}]]", [say_hello])
    assert act.rounds == 2 and greeted == ["Bob"]


def test_sdk_respond_cancel_and_act(front: ThreadServer, engines: Engines,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up")
    link(capsys, "up", up)
    respond_cancel_and_act(lms.Client(f"127.0.0.1:{front.port}"), up, "hi from the link")


def test_lms_chat_and_unload_know_linked_models(front: ThreadServer, engines: Engines,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    link(capsys, "up", engines("up"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = lms_cli(capsys, "chat", "up/tiny-chat", "-p", "[[reply: hi from afar]]")
    assert code == 0 and "hi from afar" in out, err
    code, _, err = lms_cli(capsys, "load", "up/tiny-chat")
    assert code == 0 and "up/tiny-chat is served by the link up: there is nothing to load" \
        in err
    code, _, err = lms_cli(capsys, "unload", "up/tiny-chat")
    assert code == 1 and "served by the link up" in err and "lms link rm up" in err


def test_the_chat_repl_switches_to_a_linked_model(fake_server: ThreadServer, engines: Engines,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    link(capsys, "far", engines("far", models=("far-model",)))
    chat, out, code = repl("/model far/far-model\n[[reply: from far away]]\nexit\n")
    assert code == 0 and "Model Selected: far-model" in out and "from far away" in out
    assert chat.model.identifier == "far/far-model"
