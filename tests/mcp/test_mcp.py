"""Tools from MCP servers: a real MCP server written with the official SDK
(``tests/mcp/server.py``), over stdio and Streamable HTTP, through ``lms mcp``, ``lms act
--mcp`` and ``act()`` with ``lms.mcp()``; the model is the fake engine here (the real one is
in ``test_mcp_real.py``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import lmscli as lms
from lmscli.cli.app import run
from lmscli.client import default
from lmscli.engine.fake import DEFAULT_REPLY
from lmscli.mcpservers import config, servers
from lmscli.mcpservers.config import ServerSpec
from lmscli.mcpservers.servers import McpError, McpServer
from tests.conftest import ThreadServer, free_port

SERVER = str(Path(__file__).with_name("server.py"))
CALL = '[TOOL_REQUEST]{{"name": "{name}", "arguments": {arguments}}}[END_TOOL_REQUEST]'


@pytest.fixture(autouse=True)
def fresh_default_client() -> None:
    """lms.llm() talks to this test's server, not an earlier one's."""
    default.reset_default_client()


def stdio_spec(name: str = "test", **env: str) -> ServerSpec:
    return ServerSpec(name, sys.executable, [SERVER], dict(env))


def lms_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def children_running(marker: str = SERVER) -> list[int]:
    """Processes of ours (children and their children) running the test server."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if marker in cmdline and state != "Z":
            found.append(int(pid))
    return found


# -- sessions -------------------------------------------------------------------------------

def test_a_stdio_server_lists_calls_and_ends_with_its_session(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    with McpServer(stdio_spec(NOTES_FILE=str(notes))) as server:
        tools = {fn.__name__: fn for fn in server.callables()}
        assert set(tools) == {"add", "secret_word", "write_note", "fail", "crash", "nap"}
        assert tools["add"](a=2, b=40) == "42"
        assert tools["add"].lms_parameters["required"] == ["a", "b"]
        # MCP's hints: read-only tools run freely, the others ask first
        assert not tools["add"].lms_writes and tools["write_note"].lms_writes
        assert tools["write_note"](text="hello") == "Noted."
        assert notes.read_text() == "hello\n"
        assert tools["fail"](reason="no").startswith("Error from test.fail:")
        assert children_running()
    assert not children_running()


def test_a_crash_mid_call_is_an_error_result_not_a_hang() -> None:
    with McpServer(stdio_spec()) as server:
        tools = {fn.__name__: fn for fn in server.callables()}
        started = time.monotonic()
        assert tools["crash"]().startswith("Error: MCP server test:")
        assert tools["add"](a=1, b=1).startswith("Error: MCP server test")
        assert time.monotonic() - started < 10


def test_a_call_past_the_timeout_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "CALL_TIMEOUT_S", 0.5)
    with McpServer(stdio_spec()) as server:
        nap = next(fn for fn in server.callables() if fn.__name__ == "nap")
        started = time.monotonic()
        answer = nap(seconds=5)
        assert answer.startswith("Error: MCP server test") and "time" in answer
        assert time.monotonic() - started < 3


def test_a_server_that_does_not_start_is_one_line(home: Path) -> None:
    with pytest.raises(McpError) as err:
        McpServer(ServerSpec("broken", "no-such-program-xyz")).start()
    assert err.value.message.startswith("MCP server broken did not start:")
    assert "\n" not in err.value.message
    with pytest.raises(McpError, match="did not start"):
        McpServer(ServerSpec("quits", sys.executable, ["-c", "print('hi')"])).start()
    # what a stdio server wrote on stderr is in its log, not over the terminal
    assert (home / ".internal" / "mcp-quits.log").exists()


@contextlib.contextmanager
def served(transport: str, path: str) -> Iterator[str]:
    """The test server over HTTP on loopback: its URL, once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, SERVER, transport, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}{path}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.head(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def http_server() -> Iterator[str]:
    with served("--http", "/mcp") as url:
        yield url


def test_an_older_sse_server_is_reached_too() -> None:
    with served("--sse", "/sse") as url, McpServer(ServerSpec("old", url=url)) as server:
        add = next(fn for fn in server.callables() if fn.__name__ == "add")
        assert add(a=1, b=2) == "3"


def test_a_streamable_http_server(http_server: str) -> None:
    spec = ServerSpec("web", url=http_server, headers={"X-Test": "1"})
    with McpServer(spec) as server:
        add = next(fn for fn in server.callables() if fn.__name__ == "add")
        assert add(a=20, b=22) == "42"


def test_clashing_names_get_the_servers_name(home: Path) -> None:
    with McpServer(stdio_spec("one")) as one, McpServer(stdio_spec("two")) as two:
        first = [fn.__name__ for fn in one.callables()]
        second = [fn.__name__ for fn in two.callables(first)]
        assert "add" in first and "two_add" in second


# -- mcp.json and lms mcp -------------------------------------------------------------------

def test_lms_mcp_add_ls_rm(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lms_cli(capsys, "mcp", "add", "calc", "--env", "A=1", "--",
                           sys.executable, SERVER)
    assert code == 0 and "Added the MCP server calc" in err
    data = json.loads((home / "mcp.json").read_text())
    assert data == {"mcpServers": {"calc": {"command": sys.executable, "args": [SERVER],
                                            "env": {"A": "1"}}}}
    lms_cli(capsys, "mcp", "add", "broken", "--", "no-such-program-xyz")
    code, out, _ = lms_cli(capsys, "mcp", "ls", "--json")
    listed = {s["name"]: s for s in json.loads(out)}
    assert code == 0 and listed["calc"]["started"] and listed["calc"]["type"] == "stdio"
    tools = {t["name"]: t["writes"] for t in listed["calc"]["tools"]}
    assert tools["add"] is False and tools["write_note"] is True
    assert not listed["broken"]["started"] and "did not start" in listed["broken"]["error"]
    code, out, _ = lms_cli(capsys, "mcp", "ls")
    assert code == 0 and "write_note (asks)" in out and "broken: MCP server broken" in out
    assert lms_cli(capsys, "mcp", "rm", "broken")[0] == 0
    assert list(json.loads((home / "mcp.json").read_text())["mcpServers"]) == ["calc"]
    assert not children_running()


def test_mcp_json_errors_are_one_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lms_cli(capsys, "mcp", "add", "x")
    assert code == 1 and "Give a command after -- (a stdio server) or --url" in err
    code, _, err = lms_cli(capsys, "mcp", "rm", "nope")
    assert code == 1 and "No MCP server called 'nope'" in err
    (home / "mcp.json").write_text('{"mcpServers": {"bad": {"args": []}}}')
    code, _, err = lms_cli(capsys, "mcp", "ls")
    assert code == 1 and 'needs "command"' in err and "Traceback" not in err
    (home / "mcp.json").write_text("{not json")
    code, _, err = lms_cli(capsys, "mcp", "ls")
    assert code == 1 and "Cannot read" in err


# -- agents ---------------------------------------------------------------------------------

def test_act_with_an_mcp_server_in_the_tools(fake_server: ThreadServer, home: Path) -> None:
    config.add(stdio_spec("calc"))
    chat = lms.Chat.from_history("[[reply: " + CALL.format(
        name="add", arguments='{"a": 2, "b": 3}') + "]]")
    messages: list = []
    result = lms.llm("tiny-chat-large").act(chat, [lms.mcp("calc")], on_message=messages.append)
    assert result.rounds == 2
    assert messages[1].content[0]["content"] == "5"  # the server's text, as it is
    with lms.mcp("calc") as calc:  # or started and closed by the caller
        lms.llm("tiny-chat-large").act(chat, [calc], on_message=messages.append)
    assert not children_running()
    again = lms.mcp("calc")  # a server act() ended starts again for the next act()
    for _ in range(2):
        messages.clear()
        lms.llm("tiny-chat-large").act(chat, [again], on_message=messages.append)
        assert messages[1].content[0]["content"] == "5"
    assert not children_running()


def test_lms_act_mcp_asks_before_a_write_and_denies_without_a_terminal(
        fake_server: ThreadServer, home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    config.add(stdio_spec("notes", NOTES_FILE=str(notes)))
    task = "[[reply: " + CALL.format(name="write_note", arguments='{"text": "hi"}') + "]]"
    code, out, _ = lms_cli(capsys, "act", "tiny-chat-large", task, "--mcp", "notes",
                           "--no-builtin-tools", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "write_note" in events[0]["tools"]
    results = [e for e in events if e["type"] == "tool_result"]
    assert results and "Denied" in json.dumps(results[0])
    assert not notes.exists()
    code, out, _ = lms_cli(capsys, "act", "tiny-chat-large", task, "--mcp", "all",
                           "--no-builtin-tools", "--json", "-y")
    assert code == 0 and notes.read_text() == "hi\n"
    code, _, err = lms_cli(capsys, "act", "tiny-chat-large", "hi", "--mcp", "nope")
    assert code == 1 and "No MCP server called 'nope'" in err
    assert not children_running()


# -- /api/v1/chat integrations ----------------------------------------------------------------

ADD_CALL = "[[reply: " + CALL.format(name="add", arguments='{"a": 2, "b": 3}') + "]]"


def v1_chat(server: ThreadServer, **body: object) -> httpx.Response:
    return httpx.post(server.base_url + "/api/v1/chat", timeout=60,
                      json={"model": "tiny-chat-large", "input": ADD_CALL} | body)


def sse_kinds(response: httpx.Response) -> list[tuple[str, dict]]:
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_v1_chat_runs_an_mcp_json_servers_tools(fake_server: ThreadServer, home: Path) -> None:
    config.add(stdio_spec("calc"))
    r = v1_chat(fake_server, integrations=[{"type": "plugin", "id": "mcp/calc"}])
    assert r.status_code == 200, r.text
    output = r.json()["output"]
    assert output[0] == {"type": "tool_call", "tool": "add", "arguments": {"a": 2, "b": 3},
                         "output": "5",
                         "provider_info": {"type": "plugin", "plugin_id": "mcp/calc"}}
    assert output[-1]["type"] == "message" and output[-1]["content"]
    events = sse_kinds(v1_chat(fake_server, integrations=["mcp/calc"], stream=True))
    kinds = [k for k, _ in events]
    assert kinds.index("tool_call.start") < kinds.index("tool_call.arguments") \
        < kinds.index("tool_call.success") < kinds.index("message.start")
    assert kinds[-1] == "chat.end" and events[-1][1]["result"]["output"][0]["output"] == "5"
    # allowed_tools narrows what is offered: a call of another tool is an invalid one
    r = v1_chat(fake_server, integrations=[{"type": "plugin", "id": "mcp/calc",
                                            "allowed_tools": ["secret_word"]}])
    invalid, message = r.json()["output"]
    assert invalid["type"] == "invalid_tool_call" and message["type"] == "message"
    assert invalid["metadata"] == {"type": "invalid_name", "tool_name": "add",
                                   "arguments": {"a": 2, "b": 3}}
    # mcp.json's servers are started once and kept for the next requests
    assert len(children_running()) == 1


def test_v1_chat_ephemeral_mcp_and_its_refusals(http_server: str, fake_models: Path) -> None:
    from lmscli.engine.fake import FakeEngine

    ephemeral = {"type": "ephemeral_mcp", "server_label": "web", "server_url": http_server}
    strict = ThreadServer(FakeEngine())
    try:
        r = v1_chat(strict, integrations=[ephemeral])
        assert r.status_code == 403 and "--allow-local-mcp" in r.json()["error"]["message"]
    finally:
        strict.stop()
    local = ThreadServer(FakeEngine(), allow_local_mcp=True)
    try:
        r = v1_chat(local, integrations=[ephemeral])
        assert r.status_code == 200, r.text
        assert r.json()["output"][0]["provider_info"] == {"type": "ephemeral_mcp",
                                                          "server_label": "web"}
        broken = ephemeral | {"server_url": "http://127.0.0.1:9/mcp"}
        r = v1_chat(local, integrations=[broken])
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "mcp_connection_error"
    finally:
        local.stop()


# -- lms chat --mcp -------------------------------------------------------------------------

def test_lms_chat_mcp_one_shot_calls_then_answers(
        fake_server: ThreadServer, home: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli.test_chat import Piped

    monkeypatch.setattr("sys.stdin", Piped(""))
    config.add(stdio_spec("calc"))
    code, out, err = lms_cli(capsys, "chat", "tiny-chat-large", "-p", ADD_CALL, "--mcp", "calc")
    assert code == 0, err
    assert out.endswith(DEFAULT_REPLY + "\n")  # the answer after the call's result
    assert "→ add" in err and "← 5" in err
    assert not children_running()


def test_the_chat_repl_with_mcp_tools_keeps_the_rounds(fake_server: ThreadServer,
                                                       home: Path) -> None:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from lmscli.cli.act_view import ActView
    from lmscli.cli.repl import SETTINGS, ChatSession, make_session

    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False, color_system=None)
    with McpServer(stdio_spec("calc")) as calc, create_pipe_input() as pipe:
        pipe.send_text(ADD_CALL + "\nexit\n")
        session = make_session([], SETTINGS, input=pipe, output=DummyOutput(),
                               persistent=False)
        view = ActView(False)
        chat = ChatSession(lms.llm("tiny-chat-large"), system_prompt="Be brief.",
                           session=session, console=console,
                           tools=[view.timed(fn) for fn in calc.callables()], tool_view=view)
        assert chat.run() == 0
    roles = [m["role"] for m in chat.chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert DEFAULT_REPLY in out.getvalue()
