"""lms chat against a real server thread with the fake engine: one-shot mode and the REPL."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import lmscli as lms
from lmscli.cli.app import run
from lmscli.cli.repl import SETTINGS, ChatSession, make_session
from lmscli.client import default
from lmscli.engine.fake import DEFAULT_REPLY
from tests.conftest import ThreadServer


@pytest.fixture(autouse=True)
def fresh_default_client() -> Iterator[None]:
    default.reset_default_client()
    yield


class Piped(io.StringIO):
    def isatty(self) -> bool:
        return False


# -- one-shot -------------------------------------------------------------------------------

def test_prompt_flag_streams_to_stdout(fake_server: ThreadServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", Piped(""))
    code = run(["chat", "tiny-chat", "-p", "hello"])
    out, err = capsys.readouterr()
    assert code == 0 and out == DEFAULT_REPLY + "\n"
    assert "Prediction Stats" not in err


def test_stats_block_goes_to_stderr(fake_server: ThreadServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", Piped(""))
    code = run(["chat", "tiny-chat", "-p", "hello", "--stats"])
    out, err = capsys.readouterr()
    assert code == 0 and out == DEFAULT_REPLY + "\n"
    assert "\n\nPrediction Stats:\n  Stop Reason: eosFound\n" in err
    assert "  Predicted Tokens: 6" in err and "  Total Tokens:" in err


def test_piped_stdin_joins_the_prompt(fake_server: ThreadServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", Piped("[[reply: from stdin]]\n"))
    code = run(["chat", "tiny-chat", "-p", "Summarise:"])
    assert code == 0 and capsys.readouterr().out == "from stdin\n"


def test_empty_piped_prompt(fake_server: ThreadServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", Piped("   \n"))
    code = run(["chat"])
    _, err = capsys.readouterr()
    assert code == 0  # as lms
    assert "No prompt provided for non-interactive chat." in err


def test_unknown_model(fake_server: ThreadServer, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", Piped(""))
    code = run(["chat", "zzz-nothing", "-p", "hi"])
    _, err = capsys.readouterr()
    assert code == 1 and "No model matching" in err and "Traceback" not in err


def test_uses_the_loaded_model_when_none_is_named(fake_server: ThreadServer, capsys,
                                                  monkeypatch) -> None:
    run(["load", "other-model"])
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", Piped("hi"))
    assert run(["chat"]) == 0
    assert capsys.readouterr().out == DEFAULT_REPLY + "\n"
    assert list(fake_server.models.loaded) == ["other-model"]


# -- the REPL -------------------------------------------------------------------------------

def repl(lines: str, **kwargs: object) -> tuple[ChatSession, str, int]:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False, color_system=None)
    with create_pipe_input() as pipe:
        pipe.send_text(lines)
        session = make_session([], SETTINGS, input=pipe, output=DummyOutput(),
                               persistent=False)
        chat = ChatSession(lms.llm("tiny-chat"), system_prompt="Be brief.", session=session,
                           console=console, **kwargs)
        chat.session = session
        code = chat.run()
    return chat, out.getvalue(), code


def test_conversation_is_kept_across_turns(fake_server: ThreadServer) -> None:
    chat, out, code = repl("hello\n[[reply: second]]\nexit\n")
    assert code == 0
    assert out.count(DEFAULT_REPLY) == 1 and "second" in out
    roles = [m["role"] for m in chat.chat.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_ctrl_d_quits(fake_server: ThreadServer) -> None:
    _, out, code = repl("hello\n\x04")
    assert code == 0 and DEFAULT_REPLY in out


def test_ctrl_c_clears_a_line_then_quits_on_an_empty_one(fake_server: ThreadServer) -> None:
    chat, out, code = repl("half typed\x03hi\n\x03")
    assert code == 0
    user_texts = [m["content"][0]["text"] for m in chat.chat.messages if m["role"] == "user"]
    assert user_texts == ["hi"]


def test_slash_commands(fake_server: ThreadServer) -> None:
    chat, out, _ = repl("/stats\nhi\n/stats\n/set temperature 0.25\n/set top-k x\n"
                        "/set bogus 1\n/show\n/nope\n/help\n/system-prompt Talk like a pirate"
                        "\n/clear\n/exit\n")
    assert "No previous generation stats available." in out
    assert "Stop Reason: eosFound" in out and "Predicted Tokens: 6" in out
    assert "Set temperature to 0.25." in out and chat.config == {"temperature": 0.25}
    assert "top-k needs a int" in out and "Unknown setting bogus" in out
    assert "Identifier: tiny-chat" in out and "Context length: 256" in out
    assert "Unknown command: /nope" in out
    assert "Available commands:" in out and "/system-prompt - Replace the system prompt" in out
    assert "System prompt updated to: Talk like a pirate" in out
    assert chat.chat.messages == [{"role": "system", "content": [
        {"type": "text", "text": "Talk like a pirate"}]}]


def test_retry_and_think_pass_through(fake_server: ThreadServer) -> None:
    chat, out, _ = repl("/retry\nhi\n/retry\n/think about it\nexit\n")
    assert "Nothing to retry yet." in out
    assert out.count(DEFAULT_REPLY) == 3
    user_texts = [m["content"][0]["text"] for m in chat.chat.messages if m["role"] == "user"]
    assert user_texts == ["hi", "/think about it"]


def test_model_switch(fake_server: ThreadServer) -> None:
    chat, out, _ = repl("/model\n/model other\n/model nothing-like-it\nexit\n")
    assert "tiny-chat  (current)" in out
    assert "Model Selected: Other" in out and chat.model.identifier == "other-model"
    assert 'Model "nothing-like-it" not found' in out


def test_stats_flag_prints_a_line_per_reply(fake_server: ThreadServer) -> None:
    _, out, _ = repl("hi\nexit\n", show_stats=True)
    assert "tok/s" in out and "stop: eosFound" in out


def test_prediction_error_keeps_the_session(fake_server: ThreadServer) -> None:
    chat, out, code = repl("[[fail]]\nhello\nexit\n")
    assert "Prediction error" in out and "asked to fail" in out
    assert code == 0 and DEFAULT_REPLY in out
    assert [m["role"] for m in chat.chat.messages] == ["system", "user", "assistant"]


def test_completion_of_commands_and_models(fake_models) -> None:
    from prompt_toolkit.document import Document

    from lmscli.cli.repl import SlashCompleter

    completer = SlashCompleter(["/model", "/help", "/stats"], ["temperature", "top-k"])

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert complete("/st") == ["/stats"]
    assert complete("/model tiny") == ["tiny-chat", "tiny-chat-large"]
    assert complete("/set te") == ["temperature"]
    assert complete("hello") == []



@pytest.mark.parametrize("pieces", [1, 3])
def test_replies_keep_their_line_breaks_while_markdown_renders(pieces: int) -> None:
    from lmscli.cli.chat_view import ReplyView

    haiku = ("An old silent pond\nA frog jumps into the pond\n**Splash!** Silence again\n\n"
             "- one\n- two")
    out = io.StringIO()
    view = ReplyView(Console(file=out, width=100, force_terminal=False, color_system=None))
    step = -(-len(haiku) // pieces)
    for i in range(0, len(haiku), step):  # streamed: finished blocks print as they complete
        view.add(haiku[i:i + step])
    view.finish()
    lines = [line.strip() for line in out.getvalue().splitlines() if line.strip()]
    assert lines == ["An old silent pond", "A frog jumps into the pond",
                     "Splash! Silence again", "• one", "• two"]  # still markdown
