"""``--host`` / ``--port`` / ``--api-key``: the commands reach a server of another home (another
process, as another machine's would be) and never start or read the local one."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmscli.cli import connect
from lmscli.cli.app import run
from tests.conftest import ProcessServer, free_port
from tests.gguf_factory import make_gguf


def lms(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessServer]:
    """A fake-engine server with its own home and models; this test's home has none."""
    far = tmp_path / "far-home"
    make_gguf(far / "models/test/remote-chat-GGUF/remote-chat.Q4_0.gguf", name="Remote Chat",
              context_length=256)
    monkeypatch.setenv("LMSCLI_ENGINE", "fake")
    server = ProcessServer(far)
    monkeypatch.delenv("LMSCLI_ENGINE")
    yield server
    server.stop()
    connect.use(None, None, None)


def test_commands_reach_a_remote_server(remote: ProcessServer, capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # piped, empty: -p is the prompt
    where = ["--host", "127.0.0.1", "--port", str(remote.port)]
    code, out, _ = lms(capsys, "ls", "--json", *where)
    assert code == 0 and [m["modelKey"] for m in json.loads(out)] == ["remote-chat"]
    code, _, err = lms(capsys, "load", "remote-chat", *where)
    assert code == 0 and "Model loaded successfully" in err
    code, out, _ = lms(capsys, "ps", "--json", *where)
    assert [m["identifier"] for m in json.loads(out)] == ["remote-chat"]
    code, out, _ = lms(capsys, "chat", "remote-chat", "-p", "[[reply: hi from afar]]", *where)
    assert code == 0 and "hi from afar" in out
    code, out, _ = lms(capsys, "status", *where)
    assert f"Server: ON (port: {remote.port})" in out and "remote-chat" in out
    code, out, _ = lms(capsys, "server", "status", "--json", *where)
    assert json.loads(out) == {"running": True, "port": remote.port}
    code, _, err = lms(capsys, "unload", "remote-chat", *where)
    assert code == 0 and 'Model "remote-chat" unloaded.' in err
    # the local side was never touched: no local server was started
    assert connect.running() is None


def test_environment_names_the_server(remote: ProcessServer, capsys,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMS_HOST", "127.0.0.1")
    monkeypatch.setenv("LMS_PORT", str(remote.port))
    code, out, _ = lms(capsys, "ls", "--json")
    assert code == 0 and json.loads(out)[0]["modelKey"] == "remote-chat"


def test_bad_hosts_and_silent_servers(capsys) -> None:
    code, _, err = lms(capsys, "ps", "--host", "http://example.com")
    assert code == 1 and err.strip() == "Error: Host should not include the protocol."
    code, _, err = lms(capsys, "ps", "--host", "example.com:1234")
    assert code == 1 and "Host should not include the port number. Use --port instead." in err
    port = free_port()
    code, _, err = lms(capsys, "ps", "--host", "127.0.0.1", "--port", str(port))
    assert code == 1
    assert f"The server does not appear to be running at 127.0.0.1:{port}." in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = lms(capsys, "load", "--host", "127.0.0.1", "--port", str(port))
    assert code == 1 and "Name the model to use on the remote server." in err


def test_api_key_is_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    far = tmp_path / "keyed-home"
    far.mkdir()
    monkeypatch.setenv("LMSCLI_ENGINE", "fake")
    monkeypatch.setenv("LMS_API_KEY", "sekrit-key")
    server = ProcessServer(far)
    monkeypatch.delenv("LMS_API_KEY")
    try:
        where = ["--host", "127.0.0.1", "--port", str(server.port)]
        code, _, err = lms(capsys, "ps", *where)
        assert code != 0 and "key" in err.lower()
        code, out, _ = lms(capsys, "ps", "--json", "--api-key", "sekrit-key", *where)
        assert code == 0 and json.loads(out) == []
    finally:
        server.stop()
        connect.use(None, None, None)
