"""lms chat in a real pseudo-terminal: Ctrl+C stops a reply, the server stops generating, and
the chat goes on."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest

from tests.conftest import ProcessServer


@pytest.fixture
def fake_process_server(fake_models: Path, home: Path,
                        monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessServer]:
    monkeypatch.setenv("LMSCLI_ENGINE", "fake")
    server = ProcessServer(home)
    yield server
    server.stop()


def test_ctrl_c_mid_reply_then_the_chat_continues(fake_process_server: ProcessServer) -> None:
    env = fake_process_server.env | {"TERM": "xterm", "COLUMNS": "100", "LINES": "30"}
    child = pexpect.spawn(sys.executable, ["-m", "lmscli", "chat", "tiny-chat"], env=env,
                          encoding="utf-8", timeout=20, dimensions=(30, 100))
    try:
        child.expect(r"Chatting with \S*tiny-chat")
        child.expect("› ")
        child.send("[[slow]] [[count: 400]]\r")
        child.expect("n5 n6")  # the reply is streaming
        child.sendintr()
        child.expect(r"\[Response stopped by user\]")
        child.expect("› ")
        status = loaded_status(fake_process_server)
        assert status == "idle"  # the server stopped generating, not just the display
        child.send("[[count: 3]]\r")
        child.expect("n1 n2 n3")  # the next turn is answered
        child.expect("› ")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def loaded_status(server: ProcessServer, wait_s: float = 3.0) -> str:
    deadline = time.monotonic() + wait_s
    status = ""
    while time.monotonic() < deadline:
        status = httpx.get(server.base_url + "/lmscli/models/loaded").json()[0]["status"]
        if status == "idle":
            break
        time.sleep(0.05)
    return status


def test_history_persists_between_sessions(fake_process_server: ProcessServer,
                                           home: Path) -> None:
    env = fake_process_server.env | {"TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "lmscli", "chat", "tiny-chat"], env=env,
                          encoding="utf-8", timeout=20)
    child.expect("› ")
    child.send("remember this line\r")
    child.expect("› ")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    history = (home / "chat-history").read_text()
    assert "remember this line" in history
    assert os.path.getsize(home / "chat-history") > 0
