"""Embeddings share the model's step loop (issue 22): on the real default model, a chat
answers within 2x of its time alone while 2,000 inputs are being embedded, a client that
leaves stops its embedding, and a request past OpenAI's limits is a clear 400."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProcessServer, link_default_model

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           default_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("embed-home")
    link_default_model(home, default_model_file)
    server = ProcessServer(home)
    server.load_default(2048)
    yield server
    server.stop()


def chat_seconds(server: ProcessServer, n: int) -> float:
    """A short chat's time to its first token: a new question each time, so that the prompt
    cache doesn't answer it."""
    started = time.perf_counter()
    question = f"Question {n}: which colour is the sky on a clear day, and why is it that?"
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return time.perf_counter() - started


def inputs(count: int) -> list[str]:
    return [f"a short line, number {i}" for i in range(count)]


def cpu_seconds(server: ProcessServer) -> float:
    with open(f"/proc/{server.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def busy_share(server: ProcessServer, seconds: float = 1.0) -> float:
    """The share of one core the server used over ``seconds``."""
    before = cpu_seconds(server)
    time.sleep(seconds)
    return (cpu_seconds(server) - before) / seconds


def test_a_chat_is_not_stalled_by_a_large_embedding(server: ProcessServer) -> None:
    chat_seconds(server, 0)  # warm
    alone = statistics.median(chat_seconds(server, n) for n in range(1, 6))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    failed: list[BaseException] = []

    def embed() -> None:
        try:
            conn.request("POST", "/v1/embeddings", json.dumps(
                {"model": MODEL, "input": inputs(2000)}), {"Content-Type": "application/json"})
            conn.getresponse().read()
        except OSError as exc:  # the test hung up
            failed.append(exc)

    thread = threading.Thread(target=embed, daemon=True)
    thread.start()
    time.sleep(1.0)  # the embedding is under way
    try:
        during = statistics.median(chat_seconds(server, n) for n in range(6, 11))
        assert thread.is_alive(), "the embedding ended before the chats were timed"
        print(f"\na chat alone: {alone:.3f} s; during a 2,000-input embedding: {during:.3f} s")
        assert during <= 2 * alone, (alone, during)
    finally:
        assert conn.sock is not None
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client leaves: the rest is not embedded
        thread.join(timeout=10)
    time.sleep(1.0)
    assert busy_share(server) < 0.2


def test_an_embedding_stops_when_its_client_leaves(server: ProcessServer) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/embeddings", timeout=2.0,
                   json={"model": MODEL, "input": inputs(2000)})
    time.sleep(1.0)  # the server sees the disconnect at its next input
    assert busy_share(server) < 0.2


def test_embedding_limits_are_400s(server: ProcessServer) -> None:
    url = server.base_url + "/v1/embeddings"
    r = httpx.post(url, json={"model": MODEL, "input": ["a"] * 2049}, timeout=30)
    assert r.status_code == 400 and "2048" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": MODEL, "input": ["a" * 600_001] * 2}, timeout=30)
    assert r.status_code == 400 and "1,200,000" in r.json()["error"]["message"]
