"""The server over real HTTP with the fake engine: shapes, JIT, TTL, cancellation, errors."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from lmscli.engine.fake import DEFAULT_REPLY, FakeEngine
from tests.conftest import ThreadServer


def sdk(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="lm-studio", max_retries=0)


def ask(server: ThreadServer, content: str = "hi", **kw: object) -> object:
    return sdk(server).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": content}], **kw)


def test_chat_completion_whole_and_streamed_agree(fake_server: ThreadServer) -> None:
    whole = ask(fake_server)
    assert whole.choices[0].message.content == DEFAULT_REPLY
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(ask(fake_server, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    usage = chunks[-1].usage
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and finals.count("stop") == 1


def test_second_request_reports_cached_prefix(fake_server: ThreadServer) -> None:
    first = ask(fake_server, "a long shared question")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = ask(fake_server, "a long shared question")
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_sampling_limits_and_stop_strings(fake_server: ThreadServer) -> None:
    r = ask(fake_server, "[[reply: one two three four five]]", max_tokens=2)
    assert r.choices[0].message.content == "one two "
    assert r.choices[0].finish_reason == "length"
    r = ask(fake_server, "[[reply: one two three four five]]", stop=["three"])
    assert r.choices[0].message.content == "one two "


def test_text_completion_and_v0_extras(fake_server: ThreadServer) -> None:
    r = sdk(fake_server).completions.create(model="tiny-chat", prompt="Once upon")
    assert r.choices[0].text == DEFAULT_REPLY
    body = httpx.post(fake_server.base_url + "/api/v0/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert body["stats"]["stop_reason"] == "eosFound"
    assert body["model_info"]["arch"] == "llama"
    assert body["runtime"]["name"] == "fake"


def test_embeddings(fake_server: ThreadServer) -> None:
    r = sdk(fake_server).embeddings.create(model="tiny-chat", input=["a b", "c"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 3


def test_model_listings(fake_server: ThreadServer) -> None:
    ids = [m.id for m in sdk(fake_server).models.list()]
    assert set(ids) == {"tiny-chat", "tiny-chat-large", "other-model"}
    ask(fake_server)
    v0 = httpx.get(fake_server.base_url + "/api/v0/models").json()["data"]
    states = {m["id"]: m["state"] for m in v0}
    assert states["tiny-chat"] == "loaded" and states["other-model"] == "not-loaded"
    one = httpx.get(fake_server.base_url + "/api/v0/models/tiny-chat").json()
    assert one["loaded_context_length"] == 256


def test_jit_load_once_for_concurrent_requests(fake_models: Path) -> None:
    engine = FakeEngine()
    created = []
    original = engine.create
    engine.create = lambda *a: created.append(1) or original(*a)  # type: ignore[method-assign]
    server = ThreadServer(engine)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(ask(server)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and len(created) == 1
        entry = server.models.loaded["tiny-chat"]
        assert entry.jit and entry.ttl_s == 3600
    finally:
        server.stop()


def test_jit_ttl_unloads_idle_model_and_auto_evicts(fake_server: ThreadServer) -> None:
    httpx.post(fake_server.base_url + "/v1/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "ttl": 1})
    assert "tiny-chat" in fake_server.models.loaded
    ask_other = {"model": "other-model", "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(fake_server.base_url + "/v1/chat/completions", json=ask_other | {"ttl": 1})
    assert list(fake_server.models.loaded) == ["other-model"]  # one JIT model at a time
    deadline = time.monotonic() + 5
    while fake_server.models.loaded and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fake_server.models.loaded


def test_client_disconnect_cancels_the_prediction(fake_server: ThreadServer) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    stream = ask(fake_server, f"[[slow]] [[reply: {words}]]", stream=True)
    next(iter(stream))
    stream.close()
    instance = fake_server.models.loaded["tiny-chat"].instance
    deadline = time.monotonic() + 3
    while instance.status != "idle" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert instance.status == "idle"
    assert fake_server.models.loaded["tiny-chat"].active == 0


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    (b'{"model": "tiny-chat"}', 400, "messages"),
    (b'{"model": "tiny-chat", "messages": []}', 400, "messages"),
    (b'{"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages[0].role"),
    (b'{"model": "tiny-chat", "messages": [{"content": "x"}]}', 400, "messages[0].role"),
    (b'{"model": "tiny-chat", "messages": ["hi"]}', 400, "messages[0]"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]}', 400,
     "messages[0].content"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
     b'"temperature": "hot"}', 400, "temperature"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
     b'"max_tokens": 1.5}', 400, "max_tokens"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
     b'"stream": "yes"}', 400, "stream"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
     b'"stop": [1]}', 400, "stop"),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404,
     "model"),
])
def test_bad_requests_get_openai_errors(fake_server: ThreadServer, body: bytes, status: int,
                                        param: str | None) -> None:
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param
    assert "Traceback" not in r.text
    assert ask(fake_server).choices[0].message.content == DEFAULT_REPLY  # still serving


def test_unknown_model_lists_the_available_ones(fake_server: ThreadServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(fake_server).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}])
    assert "tiny-chat" in str(info.value)


def test_too_long_prompt_is_a_400(fake_server: ThreadServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(fake_server, "word " * 400)
    assert "context length of 256" in str(info.value)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_unknown_route_is_a_json_404(fake_server: ThreadServer) -> None:
    r = httpx.get(fake_server.base_url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_engine_failure_is_reported_and_server_survives(fake_server: ThreadServer) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        ask(fake_server, "[[fail]]")
    assert "asked to fail" in str(info.value)
    assert ask(fake_server).choices[0].message.content == DEFAULT_REPLY


def test_corrupt_gguf_fails_to_load_and_server_stays_up(fake_server: ThreadServer,
                                                         fake_models: Path) -> None:
    bad = fake_models / "test/broken-GGUF/broken.Q4_0.gguf"
    bad.parent.mkdir(parents=True)
    good = (fake_models / "test/tiny-chat-GGUF/tiny-chat.Q4_0.gguf").read_bytes()
    bad.write_bytes(good[:200])  # a truncated header: not even listed
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", json={
        "model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert ask(fake_server).choices[0].message.content == DEFAULT_REPLY


def test_load_streams_progress_then_success(fake_server: ThreadServer) -> None:
    with httpx.stream("POST", fake_server.base_url + "/lmscli/models/load",
                      json={"model": "tiny-chat", "identifier": "mine", "ttl": 60}) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    progress = [e["progress"] for e in events if e["type"] == "progress"]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    assert events[-1]["type"] == "success"
    assert events[-1]["info"]["identifier"] == "mine"
    assert events[-1]["info"]["ttlMs"] == 60000
    again = httpx.post(fake_server.base_url + "/lmscli/models/load",
                       json={"model": "tiny-chat", "identifier": "mine"})
    assert again.status_code == 409
    second = httpx.post(fake_server.base_url + "/lmscli/models/load",
                        json={"model": "tiny-chat"}).text
    assert '"identifier": "tiny-chat"' in second
    third = httpx.post(fake_server.base_url + "/lmscli/models/load",
                       json={"model": "tiny-chat"}).text
    assert '"identifier": "tiny-chat:2"' in third


def test_unload(fake_server: ThreadServer) -> None:
    ask(fake_server)
    r = httpx.post(fake_server.base_url + "/lmscli/models/unload",
                   json={"identifier": "tiny-chat"})
    assert r.json() == {"identifier": "tiny-chat"}
    r = httpx.post(fake_server.base_url + "/lmscli/models/unload",
                   json={"identifier": "tiny-chat"})
    assert r.status_code == 404


def test_cors_is_off_by_default_and_on_with_the_flag(fake_models: Path) -> None:
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    plain = ThreadServer(FakeEngine())
    try:
        r = httpx.options(plain.base_url + "/v1/models", headers=headers)
        assert "access-control-allow-origin" not in r.headers
    finally:
        plain.stop()
    cors = ThreadServer(FakeEngine(), cors=True)
    try:
        r = httpx.options(cors.base_url + "/v1/models", headers=headers)
        assert r.headers.get("access-control-allow-origin") in ("*", "http://evil.example")
    finally:
        cors.stop()


def test_the_servers_connections_send_small_writes_at_once() -> None:
    """The listening socket says it is TCP, so asyncio turns Nagle off on each connection:
    else a stream's first chunk after its headers waits ~40 ms for the client's ACK whenever
    a request follows another on one keep-alive connection."""
    import asyncio
    import socket

    from lmscli.server.run import bind

    async def accept_one() -> int:
        sock = bind("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(accept_one()) != 0
