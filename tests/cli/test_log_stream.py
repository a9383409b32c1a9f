"""``lms log stream`` and its server route over real HTTP, with the fake engine."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lmscli import serverstate
from lmscli.cli import log as log_cli
from lmscli.cli.app import run
from lmscli.client.logs import stream_logs
from lmscli.engine.fake import DEFAULT_REPLY, FakeEngine
from lmscli.errors import ServerNotRunningError
from lmscli.server import logs_http
from tests.conftest import ThreadServer, free_port

MODEL_PATH = "test/tiny-chat-GGUF/tiny-chat.Q4_0.gguf"
PROMPT = "Once upon a time\nthere was"


class LogProcess:
    """``lms log stream ...`` as a subprocess whose stdout and stderr lines can be awaited."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmscli", "log", "stream", *args], env=os.environ.copy(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.err_seen: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=_pipe, args=(stream, sink), daemon=True).start()

    def out_lines(self, n: int, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        return [self.out.get(timeout=max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def wait_err(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.err.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.err_seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} never came on stderr; got {self.err_seen}")

    def started(self) -> None:
        assert self.wait_err("Streaming logs from lmscli") == "Streaming logs from lmscli\n"
        assert self.err.get(timeout=5) == "\n"

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _pipe(stream: Any, sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)


@pytest.fixture
def streams() -> Iterator[list[LogProcess]]:
    started: list[LogProcess] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)


def start(streams: list[LogProcess], *args: str) -> LogProcess:
    p = LogProcess(*args)
    streams.append(p)
    p.started()
    return p


def complete(server: ThreadServer, prompt: str = PROMPT, **body: Any) -> dict[str, Any]:
    r = httpx.post(server.base_url + "/v1/completions", timeout=30,
                   json={"model": "tiny-chat", "prompt": prompt} | body)
    r.raise_for_status()
    return r.json()


def event_of(line: str) -> dict[str, Any]:
    event = json.loads(line)
    assert line == json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n"
    return event


# -- the text and JSON formats ----------------------------------------------------------------

def test_text_format_matches_the_json_events(fake_server: ThreadServer,
                                             streams: list[LogProcess]) -> None:
    complete(fake_server, "warm up")  # JIT-load first: its runtime events are not tested here
    text = start(streams, "--stats")
    raw = start(streams, "--json")
    complete(fake_server)
    given, produced = (event_of(line) for line in raw.out_lines(2))
    assert given["data"] == {"type": "llm.prediction.input", "input": PROMPT,
                             "modelPath": MODEL_PATH, "modelIdentifier": "tiny-chat"}
    assert produced["data"]["type"] == "llm.prediction.output"
    assert produced["data"]["output"] == DEFAULT_REPLY
    stats = produced["data"]["stats"]
    assert stats["stopReason"] == "eosFound" and stats["predictedTokensCount"] == 6

    assert text.out_lines(9) == [
        f"timestamp: {log_cli.locale_timestamp(given['timestamp'])}\n",
        "type: llm.prediction.input\n",
        "modelIdentifier: tiny-chat\n",
        f"modelPath: {MODEL_PATH}\n",
        "input:\n",
        "Once upon a time\n",
        "there was\n",
        "\n", "\n"]
    assert text.out_lines(4) == [
        f"timestamp: {log_cli.locale_timestamp(produced['timestamp'])}\n",
        "type: llm.prediction.output\n",
        "modelIdentifier: tiny-chat\n",
        "output:\n"]
    assert text.out_lines(1) == [DEFAULT_REPLY + "\n"]
    assert text.out_lines(len(stats)) == [f"{k}: {log_cli.js_string(v)}\n"
                                          for k, v in stats.items()]
    assert text.out_lines(2) == ["\n", "\n"]
    for p in (text, raw):
        assert p.stop() == 0
    assert text.out.empty() and raw.out.empty()


def test_json_chat_input_holds_the_templated_prompt(fake_server: ThreadServer,
                                                    streams: list[LogProcess]) -> None:
    raw = start(streams, "--json", "--filter", "input")
    body = {"model": "tiny-chat", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi there"}]}
    httpx.post(fake_server.base_url + "/v1/chat/completions", json=body, timeout=30)
    (line,) = raw.out_lines(1)
    data = event_of(line)["data"]
    assert data["type"] == "llm.prediction.input"
    assert "<|im_start|>system\nBe brief.<|im_end|>" in data["input"]
    assert "<|im_start|>user\nHi there<|im_end|>" in data["input"]
    assert data["input"].endswith("<|im_start|>assistant\n")
    httpx.post(fake_server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert event_of(raw.out_lines(1)[0])["data"]["type"] == "llm.prediction.input"  # no output
    assert raw.stop(signal.SIGTERM) == 0


def test_streamed_and_cancelled_predictions_log_what_was_generated(
        fake_server: ThreadServer, streams: list[LogProcess]) -> None:
    raw = start(streams, "--json", "--filter", "output")
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", timeout=30, json={
            "model": "tiny-chat", "prompt": "[[slow]] [[count: 200]]", "stream": True}) as r:
        for line in r.iter_lines():
            if "n3" in line:
                break  # the client goes away mid-stream
    data = event_of(raw.out_lines(1, timeout=15)[0])["data"]
    assert data["output"].startswith("n1 n2 n3") and len(data["output"].split()) < 200
    assert data["stats"]["stopReason"] == "userStopped"
    assert raw.stop() == 0


def test_server_and_runtime_sources(fake_server: ThreadServer,
                                    streams: list[LogProcess]) -> None:
    server = start(streams, "-s", "server")
    runtime = start(streams, "--source", "runtime")
    complete(fake_server)
    httpx.get(fake_server.base_url + "/v1/nothing-here")
    first, second = server.out_lines(2)
    assert re.fullmatch(r"POST /v1/completions 200 \d+ms model=tiny-chat\n", first), first
    assert re.fullmatch(r"GET /v1/nothing-here 404 \d+ms\n", second), second
    pid = os.getpid()  # the thread server runs in this process
    loading, loaded = runtime.out_lines(2)
    assert loading == f"[INFO] fake@1.0 (llm) tiny-chat pid={pid} Loading tiny-chat as " \
                      "tiny-chat\n"
    assert re.fullmatch(rf"\[INFO\] fake@1\.0 \(llm\) tiny-chat pid={pid} Loaded tiny-chat "
                        r"in \d+\.\d\ds\n", loaded), loaded
    httpx.post(fake_server.base_url + "/lmscli/models/unload", json={"identifier": "tiny-chat"})
    assert runtime.out_lines(1) == [f"[INFO] fake@1.0 (llm) tiny-chat pid={pid} Unloaded "
                                    "tiny-chat\n"]
    assert server.stop() == 0 and runtime.stop() == 0


def test_a_lone_surrogate_model_name_does_not_break_the_stream(
        fake_server: ThreadServer, streams: list[LogProcess]) -> None:
    server = start(streams, "-s", "server", "--json")
    r = httpx.post(fake_server.base_url + "/v1/completions",
                   content=b'{"model": "x\\ud800", "prompt": "hi"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    complete(fake_server)
    first, second = (event_of(line)["data"]["content"] for line in server.out_lines(2))
    assert first.startswith("POST /v1/completions 400") and first.endswith("model=x?")
    assert second.startswith("POST /v1/completions 200")
    assert server.stop() == 0


def test_values_are_green_on_a_terminal_and_ctrl_c_exits_0(fake_server: ThreadServer) -> None:
    import pexpect

    env = os.environ | {"TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "lmscli", "log", "stream", "--stats"],
                          env=env, encoding="utf-8", timeout=20)
    try:
        child.expect("Streaming logs from lmscli")
        complete(fake_server)
        child.expect("\r\nmodelPath: \x1b\\[32m" + re.escape(MODEL_PATH) + "\x1b\\[0m\r\n")
        child.expect("input:\r\n\x1b\\[32mOnce upon a time\r\nthere was\x1b\\[0m\r\n")
        child.expect("\r\nstopReason: \x1b\\[32meosFound\x1b\\[0m\r\n")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# -- options and errors (in process) ----------------------------------------------------------

def lms(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["--source", "server", "--stats"], "--stats can only be used with --source model"),
    (["-s", "runtime", "--filter", "input"], "--filter can only be used with --source model"),
    (["--filter", ""], "--filter cannot be empty"),
    (["--filter", "input,everything"],
     "--filter values must be 'input', 'output', or 'input,output'"),
])
def test_option_errors(fake_server: ThreadServer, capsys: pytest.CaptureFixture[str],
                       args: list[str], message: str) -> None:
    code, out, err = lms(capsys, "log", "stream", *args)
    assert (code, out, err) == (1, "", f"Error: {message}\n")


def test_unknown_source_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = lms(capsys, "log", "stream", "-s", "gpu")
    assert code == 1 and out == "" and "gpu" in err


def test_server_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    expected = "Error: The server is not running. Start it with: lms server start\n"
    assert lms(capsys, "log", "stream") == (1, "", expected)
    # a state file whose port nobody answers on: the same
    serverstate.write_state(serverstate.ServerState(os.getpid(), "127.0.0.1", free_port(), 0))
    assert lms(capsys, "log", "stream", "--json") == (1, "", expected)
    with pytest.raises(ServerNotRunningError):
        next(stream_logs(f"http://127.0.0.1:{free_port()}"))


def test_waits_for_the_server_to_come_back_on_another_port(
        fake_server: ThreadServer, streams: list[LogProcess]) -> None:
    raw = start(streams, "--json", "-s", "server")
    started = time.monotonic()
    fake_server.stop()
    assert time.monotonic() - started < 5  # an open log stream does not hold the server up
    raw.wait_err("Lost the connection to the server. Waiting for it to come back")
    time.sleep(1.5)  # a poll or two against nothing
    again = ThreadServer(FakeEngine())
    try:
        assert again.port != fake_server.port
        raw.wait_err(f"Reconnected to the server at {again.base_url}.")
        httpx.get(again.base_url + "/v1/models")
        (line,) = raw.out_lines(1)
        assert event_of(line)["data"]["content"].startswith("GET /v1/models 200 ")
        assert raw.stop() == 0
    finally:
        again.stop()


# -- keep-alives and dead connections ------------------------------------------------------

def test_idle_streams_keep_alive_and_the_client_skips_them(
        fake_server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs_http, "KEEPALIVE_S", 0.1)
    monkeypatch.setattr(logs_http, "STOP_POLL_S", 0.05)
    with httpx.stream("GET", fake_server.base_url + logs_http.STREAM_PATH, timeout=5) as r:
        lines = r.iter_lines()
        assert [json.loads(next(lines)) for _ in range(3)] == [
            {"type": "subscribed"}, {"type": "keepAlive"}, {"type": "keepAlive"}]
    # silences shorter than the read timeout never end the client's stream
    messages = stream_logs(fake_server.base_url, read_timeout_s=0.5)
    assert next(messages) == {"type": "subscribed"}
    threading.Timer(1.5, complete, args=(fake_server,)).start()
    kinds = [next(messages)["log"]["data"]["type"] for _ in range(3)]
    assert kinds == ["runtime.log", "runtime.log", "llm.prediction.input"]  # JIT load first
    messages.close()


def test_a_silent_server_ends_the_stream_after_the_read_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:  # answers, subscribes, then says nothing more
        conn, _ = listener.accept()
        conn.recv(65536)
        line = b'{"type":"subscribed"}\n'
        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     + f"{len(line):x}\r\n".encode() + line + b"\r\n")
        time.sleep(5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    assert list(stream_logs(f"http://127.0.0.1:{port}", read_timeout_s=0.3)) == [
        {"type": "subscribed"}]
    assert time.monotonic() - started < 3
    listener.close()


# -- a reader that never reads ----------------------------------------------------------------

def test_a_stuck_reader_never_slows_predictions(fake_server: ThreadServer) -> None:
    bus = fake_server.app.state.server.logs
    bus.buffer = 50
    complete(fake_server, "warm up")  # JIT-load before the reader subscribes
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", fake_server.port))
    stuck.sendall(b"GET /lmscli/logs/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        deadline = time.monotonic() + 5
        while bus.subscriber_count < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bus.subscriber_count == 1
        requests = 600
        prompt = "[[count: 3]] " + "x" * 16_000  # one long word: big events, few tokens
        latencies = []
        with httpx.Client(base_url=fake_server.base_url, timeout=5) as http:
            for _ in range(requests):
                began = time.perf_counter()
                http.post("/v1/completions", json={"model": "tiny-chat", "prompt": prompt}
                          ).raise_for_status()
                latencies.append(time.perf_counter() - began)
        assert statistics.median(latencies) < 0.05, statistics.median(latencies)
        assert max(latencies) < 1.0, max(latencies)
        # reading at last: every event (input, output, request line) came or was counted
        delivered, dropped = read_stream(stuck, until=3 * requests)
        assert dropped > 0 and delivered + dropped == 3 * requests
    finally:
        stuck.close()
    deadline = time.monotonic() + 5
    while bus.subscriber_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bus.subscriber_count == 0


def read_stream(sock: socket.socket, until: int) -> tuple[int, int]:
    """Decode the chunked NDJSON response until ``until`` events were delivered or dropped."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, data = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    payload, delivered, dropped = b"", 0, 0
    while delivered + dropped < until:
        while b"\r\n" not in data:
            data += sock.recv(65536)
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(data) < size + 2:
            data += sock.recv(65536)
        payload += data[:size]
        data = data[size + 2:]
        *lines, payload = payload.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if message["type"] == "log":
                delivered += 1
            elif message["type"] == "dropped":
                dropped += message["count"]
    return delivered, dropped
