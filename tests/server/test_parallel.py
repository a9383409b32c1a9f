"""Parallel slots through the server and the CLI (fake engine): --parallel, ps, queue, 503."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from lmscli.cli.app import run
from lmscli.engine.fake import FakeEngine
from tests.conftest import ThreadServer


def lms(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def small_queue_server(fake_models: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(FakeEngine(), reap_every_s=0.1, parallel=2, max_queue=1)
    yield server
    server.stop()


def ps_json(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    code, out, _ = lms(capsys, "ps", "--json")
    assert code == 0
    return json.loads(out)


def test_load_parallel_shows_in_ps(fake_server: ThreadServer, capsys) -> None:
    code, _, err = lms(capsys, "load", "tiny-chat", "--parallel", "2")
    assert code == 0, err
    lms(capsys, "load", "tiny-chat", "--identifier", "default-slots")
    by_id = {m["identifier"]: m for m in ps_json(capsys)}
    assert by_id["tiny-chat"]["parallel"] == 2 and by_id["default-slots"]["parallel"] == 4
    _, out, _ = lms(capsys, "ps")
    header, *rows = out.splitlines()
    row = next(line for line in rows if line.startswith("tiny-chat "))
    at = header.index("PARALLEL")
    assert row[at:].split()[0] == "2"
    code, _, err = lms(capsys, "load", "tiny-chat", "--identifier", "x", "--parallel", "0")
    assert code == 1 and "--parallel" in err  # lms exits 1 on usage errors


def test_jit_loads_take_the_server_setting(small_queue_server: ThreadServer, capsys) -> None:
    client = OpenAI(base_url=small_queue_server.base_url + "/v1", api_key="x")
    client.chat.completions.create(model="tiny-chat", messages=[{"role": "user",
                                                                 "content": "hi"}])
    (entry,) = ps_json(capsys)
    assert entry["parallel"] == 2 and entry["jit"] is True


def stream_words(base_url: str, text: str, out: list[tuple[float, str]]) -> None:
    client = OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": text}], stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            out.append((time.perf_counter(), chunk.choices[0].delta.content))
    out.append((time.perf_counter(), "<end>"))


def test_two_streams_interleave_over_http(small_queue_server: ThreadServer) -> None:
    a: list[tuple[float, str]] = []
    b: list[tuple[float, str]] = []
    url = small_queue_server.base_url
    threads = [threading.Thread(target=stream_words, args=(url, "[[slow]] [[count: 15]]", out))
               for out in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert a[-1][1] == b[-1][1] == "<end>"
    first_end = min(a[-1][0], b[-1][0])
    assert a[0][0] < first_end - 0.3 and b[0][0] < first_end - 0.3
    assert "".join(w for _, w in a[:-1]).split() == [f"n{i}" for i in range(1, 16)]


def test_a_full_queue_answers_503_with_retry_after(small_queue_server: ThreadServer,
                                                   capsys) -> None:
    url = small_queue_server.base_url
    outs: list[list[tuple[float, str]]] = [[], [], []]
    threads = [threading.Thread(target=stream_words, args=(url, "[[slow]] [[count: 30]]", o))
               for o in outs]
    for t in threads:
        t.start()
        time.sleep(0.3)
    (entry,) = ps_json(capsys)
    assert entry["queued"] == 1 and entry["status"] == "generating"
    _, out, _ = lms(capsys, "ps")
    assert "GENERATING (1 QUEUED)" in out
    refused = httpx.post(url + "/v1/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "one more"}]})
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert "busy" in refused.json()["error"]["message"]
    for t in threads:
        t.join(timeout=30)
    assert all(o[-1][1] == "<end>" for o in outs)  # nobody already admitted lost anything
    ok = httpx.post(url + "/v1/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "now"}]}, timeout=10)
    assert ok.status_code == 200
