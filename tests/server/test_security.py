"""Who may talk to the server: API key, Host check, JSON-only writes, body limit, and a
``server stop`` that signals only its own server. Real uvicorn servers, fake engine."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

import lmscli as lms
from lmscli import serverstate
from lmscli.client.logs import follow_logs
from lmscli.engine.fake import DEFAULT_REPLY, FakeEngine
from lmscli.server.errors import OLLAMA
from lmscli.server.security import HostPolicy
from tests.conftest import ProcessServer, ThreadServer, free_port

KEY = "sk-test-0123456789"
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LMS_API_KEY", "LM_API_TOKEN", "LMS_ALLOWED_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LMSCLI_ENGINE", "fake")  # for servers started as processes


@pytest.fixture
def keyed(fake_models: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(FakeEngine(), api_key=KEY)
    yield server
    server.stop()


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def lms_cli(*args: str, key: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``lms`` command in its own process, with LMS_API_KEY set or not."""
    env = {k: v for k, v in os.environ.items() if k not in ("LMS_API_KEY", "LM_API_TOKEN")}
    env |= {"NO_COLOR": "1"} | ({"LMS_API_KEY": key} if key else {})
    return subprocess.run([sys.executable, "-m", "lmscli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- the API key ----------------------------------------------------------------------------

def concrete(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "x", path)  # /api/v0/models/{model:path} -> .../x


def test_key_guards_every_endpoint_but_the_greeting(keyed: ThreadServer) -> None:
    assert httpx.get(keyed.base_url + "/lmstudio-greeting").json() == {"lmstudio": True}
    for route in keyed.app.routes:
        if route.path == "/lmstudio-greeting":
            continue
        method = "POST" if "POST" in (getattr(route, "methods", None) or ()) else "GET"
        r = httpx.request(method, keyed.base_url + concrete(route.path), json={})
        assert r.status_code == 401, (route.path, r.text)
        if route.path.startswith("/v1/messages"):  # Anthropic's error shape has no code
            assert r.json()["error"]["type"] == "authentication_error"
        elif getattr(route, "surface", None) is OLLAMA:  # Ollama's error is one string
            assert "API key" in r.json()["error"]
        else:
            assert r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(keyed.base_url + "/v1/models", headers=bearer("sk-wrong"))
    assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
    assert httpx.get(keyed.base_url + "/v1/models", headers=bearer()).status_code == 200
    # Anthropic's SDK sends x-api-key
    assert httpx.get(keyed.base_url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_openai_sdk_with_and_without_the_key(keyed: ThreadServer) -> None:
    good = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0)
    reply = good.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == DEFAULT_REPLY
    bad = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="lm-studio", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        bad.chat.completions.create(**CHAT)  # type: ignore[call-overload]


def test_anthropic_paths_get_anthropic_error_bodies(keyed: ThreadServer) -> None:
    r = httpx.post(keyed.base_url + "/v1/messages", json={})
    assert r.status_code == 401
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"


def test_log_stream_needs_the_key(keyed: ThreadServer,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    r = httpx.get(keyed.base_url + "/lmscli/logs/stream")
    assert r.status_code == 401  # nobody reads other users' prompts without the key
    with pytest.raises(lms.ServerError, match="needs an API key"):
        next(follow_logs())
    monkeypatch.setenv("LMS_API_KEY", KEY)
    stream = follow_logs()
    assert next(stream)["type"] == "subscribed"
    stream.close()


def test_client_sends_the_key_from_the_environment(keyed: ThreadServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(lms.ServerError, match="needs an API key: set LMS_API_KEY") as info:
        lms.Client().list_loaded_models()
    assert info.value.status == 401
    monkeypatch.setenv("LMS_API_KEY", "sk-wrong")
    with pytest.raises(lms.ServerError, match="rejected the API key"):
        lms.Client().list_loaded_models()
    monkeypatch.setenv("LMS_API_KEY", KEY)
    with lms.Client() as client:
        assert client.llm.model("tiny-chat").respond("hi").content == DEFAULT_REPLY
    monkeypatch.delenv("LMS_API_KEY")
    monkeypatch.setenv("LM_API_TOKEN", KEY)  # LM Studio's name works too
    with lms.Client() as client:
        assert [m.identifier for m in client.list_loaded_models()] == ["tiny-chat"]
    monkeypatch.delenv("LM_API_TOKEN")
    with lms.Client(api_key=KEY) as client:  # or in code
        assert [m.identifier for m in client.list_loaded_models()] == ["tiny-chat"]


def test_lms_commands_with_and_without_the_key(keyed: ThreadServer) -> None:
    ok = lms_cli("chat", "tiny-chat", "-p", "hi", key=KEY)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == DEFAULT_REPLY
    listed = lms_cli("ps", "--json", key=KEY)
    assert [m["identifier"] for m in json.loads(listed.stdout)] == ["tiny-chat"]
    for args in (("ps",), ("chat", "tiny-chat", "-p", "hi")):
        refused = lms_cli(*args)
        assert refused.returncode == 1
        assert refused.stderr.strip() == "Error: The server needs an API key: set LMS_API_KEY."
        assert refused.stdout == ""


def test_cors_preflight_passes_and_refusals_carry_cors_headers(fake_models: Path) -> None:
    server = ThreadServer(FakeEngine(), api_key=KEY, cors=True)
    try:
        origin = {"Origin": "http://app.example"}
        pre = httpx.options(server.base_url + "/v1/models", headers=origin | {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        r = httpx.get(server.base_url + "/v1/models", headers=origin)
        assert r.status_code == 401  # the web app can read why
        assert r.headers["access-control-allow-origin"] in ("*", "http://app.example")
    finally:
        server.stop()


# -- Host -----------------------------------------------------------------------------------

def test_foreign_host_is_refused(fake_server: ThreadServer) -> None:
    url = fake_server.base_url + "/v1/models"
    r = httpx.get(url, headers={"Host": "evil.example:1234"})
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["code"] == "host_not_allowed" and "--allowed-host evil.example" in err["message"]
    # even the greeting: a rebinding page must not learn that a server is here
    assert httpx.get(fake_server.base_url + "/lmstudio-greeting",
                     headers={"Host": "evil.example"}).status_code == 403
    for host in ("localhost", f"localhost:{fake_server.port}", "127.0.0.1",
                 f"[::1]:{fake_server.port}", "LOCALHOST"):
        assert httpx.get(url, headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_network_binds(fake_models: Path) -> None:
    allowed = ThreadServer(FakeEngine(), allowed_hosts=("myapp.test",))
    try:
        url = allowed.base_url + "/v1/models"
        assert httpx.get(url, headers={"Host": "myapp.test:8080"}).status_code == 200
        assert httpx.get(url, headers={"Host": "other.test"}).status_code == 403
    finally:
        allowed.stop()
    # the app believes it listens on every interface, with a key: any Host, key required
    wide = ThreadServer(FakeEngine(), host="0.0.0.0", api_key=KEY)
    try:
        url = wide.base_url + "/v1/models"
        assert httpx.get(url, headers={"Host": "box.lan"} | bearer()).status_code == 200
        assert httpx.get(url, headers={"Host": "box.lan"}).status_code == 401
    finally:
        wide.stop()


def test_host_policy_for_binds() -> None:
    loop = HostPolicy.for_bind("127.0.0.1")
    assert loop.allows("127.0.0.1:1234") and loop.allows("[::1]") and loop.allows(None)
    assert not loop.allows("attacker.example") and not loop.allows(socket.gethostname() + "x")
    open_lan = HostPolicy.for_bind("0.0.0.0")  # --allow-unauthenticated
    assert open_lan.allows("192.168.1.20:1234") and open_lan.allows(socket.gethostname())
    assert not open_lan.allows("rebind.attacker.example")
    assert HostPolicy.for_bind("0.0.0.0", keyed=True).allows("rebind.attacker.example")
    assert HostPolicy.for_bind("127.0.0.1", ["*"]).allows("anything.example")


# -- JSON-only writes and the body limit ----------------------------------------------------

def test_posts_must_be_json(fake_server: ThreadServer) -> None:
    shutdown = fake_server.base_url + "/lmscli/shutdown"
    # what a web page can send without a preflight: text/plain, a form, or no body at all
    for headers, body in (({"Content-Type": "text/plain"}, b'{"x": 1}'),
                          ({"Content-Type": "application/x-www-form-urlencoded"}, b"a=b"),
                          ({}, b"")):
        r = httpx.post(shutdown, headers=headers, content=body)
        assert r.status_code == 415, headers
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert httpx.get(fake_server.base_url + "/lmstudio-greeting").status_code == 200
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", content=json.dumps(CHAT),
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.json()["choices"][0]["message"]["content"] == DEFAULT_REPLY


def test_a_write_without_a_body_needs_no_content_type(fake_server: ThreadServer) -> None:
    """A DELETE has no body to be JSON, and a page can't send one without a preflight."""
    created = httpx.post(fake_server.base_url + "/v1/responses",
                         json={"model": "tiny-chat", "input": "hi"}).json()
    url = f"{fake_server.base_url}/v1/responses/{created['id']}"
    r = httpx.delete(url)
    assert "content-type" not in r.request.headers
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert httpx.delete(url).status_code == 404  # gone: not a 415 either
    with_body = httpx.request("DELETE", url, content=b"id=1",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert with_body.status_code == 415


def test_body_over_the_limit_is_413(fake_models: Path) -> None:
    server = ThreadServer(FakeEngine(), max_body_mb=1)
    try:
        url = server.base_url + "/v1/chat/completions"
        big = CHAT | {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
        r = httpx.post(url, json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        assert "1 MB" in r.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            data = json.dumps(big).encode()
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]

        r = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        small = CHAT | {"messages": [{"role": "user", "content": "x" * 500_000}]}
        assert httpx.post(url, json=small, timeout=30).status_code == 200
    finally:
        server.stop()


def test_default_limit_answers_before_the_body_is_sent(fake_server: ThreadServer) -> None:
    with socket.create_connection(("127.0.0.1", fake_server.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Content-Length: {33 * 1024 * 1024}\r\n\r\n".encode())
        reply = b""
        while b"}}" not in reply and (chunk := s.recv(4096)):
            reply += chunk
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert "limit of 32 MB" in json.loads(body)["error"]["message"]


# -- start, stop ----------------------------------------------------------------------------

def test_network_bind_needs_a_key(home: Path) -> None:
    r = lms_cli("server", "start", "--bind", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 1
    assert r.stderr.startswith("Error: Refusing to listen on 0.0.0.0 without an API key")
    assert "--allow-unauthenticated" in r.stderr and "Traceback" not in r.stderr
    assert not (home / ".internal" / "server.json").exists()
    direct = subprocess.run([sys.executable, "-m", "lmscli.server", "--host", "0.0.0.0",
                             "--port", str(free_port())], capture_output=True, text=True,
                            timeout=60)
    assert direct.returncode != 0 and "Refusing to listen" in direct.stderr


def test_foreground_start_on_a_busy_port_fails(home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = lms_cli("server", "start", "--foreground", "--port", str(port))
    assert r.returncode != 0
    assert f"Port {port} is already in use" in r.stderr


def test_keyed_daemon_start_use_and_stop(fake_models: Path) -> None:
    port = free_port()
    started = lms_cli("server", "start", "--port", str(port), "--api-key", KEY)
    try:
        assert started.returncode == 0, started.stderr
        assert f"Success! Server is now running on port {port}" in started.stderr
        argv = (Path("/proc") / str(serverstate.read_state().pid) / "cmdline").read_bytes()
        assert KEY.encode() not in argv  # the key travels in the environment, not argv
        assert lms_cli("ls", key=KEY).returncode == 0
        refused = lms_cli("ls")
        assert "needs an API key" in refused.stderr and refused.returncode == 1
        assert lms_cli("server", "status").stderr.strip() == \
            f"The server is running on port {port}."
    finally:
        stopped = lms_cli("server", "stop")  # without the key: its own user may still stop it
    assert stopped.returncode == 0, stopped.stderr
    assert f"Stopped the server on port {port}." in stopped.stderr
    assert serverstate.read_state() is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/lmstudio-greeting")


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def write_state(pid: int, port: int, proc_start: int | None = None) -> None:
    serverstate.write_state(serverstate.ServerState(pid, "127.0.0.1", port, time.time(),
                                                    proc_start))


def assert_not_running(stop: subprocess.CompletedProcess[str]) -> None:
    assert stop.returncode == 1
    assert stop.stderr.strip() == "Error: The server is not running."
    assert serverstate.read_state() is None  # the stale file is gone


def test_stop_never_kills_an_unrelated_process(home: Path,
                                               stranger: subprocess.Popen[bytes]) -> None:
    write_state(stranger.pid, free_port())  # nothing listens there
    assert_not_running(lms_cli("server", "stop"))
    assert stranger.poll() is None


def test_stop_with_a_stale_pid_leaves_the_server_on_its_port(
        fake_server: ThreadServer, stranger: subprocess.Popen[bytes]) -> None:
    write_state(stranger.pid, fake_server.port)  # a server answers, but it is not that pid
    assert_not_running(lms_cli("server", "stop"))
    assert stranger.poll() is None
    assert httpx.get(fake_server.base_url + "/v1/models").status_code == 200


def test_stop_never_stops_another_homes_server(home: Path, tmp_path: Path) -> None:
    other_home = tmp_path / "other-home"
    other_home.mkdir()
    other = ProcessServer(other_home)
    try:
        # as if our server had died and the other home's server got its pid and port
        started = serverstate.process_start(other.proc.pid)
        assert started is not None
        write_state(other.proc.pid, other.port, started - 100)
        assert_not_running(lms_cli("server", "stop"))
        assert other.proc.poll() is None
        assert httpx.get(other.base_url + "/lmstudio-greeting").status_code == 200
    finally:
        other.stop()
