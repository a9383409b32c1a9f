"""``lms load``'s speculative decoding flags reach the load, ``lms ps --json`` shows them, and
bad ones exit 1 with one line; ``lms chat --stats`` names the draft model, and its requests
draft within the load's limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmscli.cli import render
from lmscli.client.results import LlmPredictionStats
from tests.cli.test_chat import Piped
from tests.cli.test_commands import lms
from tests.conftest import ThreadServer
from tests.server.test_speculative_requests import RecordingEngine

DRAFT = "tiny-chat-large"


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def server(fake_models: Path, engine: RecordingEngine) -> Iterator[ThreadServer]:
    server = ThreadServer(engine)
    yield server
    server.stop()


def test_load_with_a_draft_model_and_limits(server: ThreadServer, engine: RecordingEngine,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lms(capsys, "load", "tiny-chat", "--speculative-draft-model", DRAFT,
                       "--speculative-draft-max-tokens", "8",
                       "--speculative-draft-min-tokens", "2")
    assert code == 0, err
    options = engine.loads[-1]
    assert options.draft_model is not None and options.draft_model.model_key == DRAFT
    assert (options.draft_max, options.draft_min) == (8, 2)
    code, out, _ = lms(capsys, "ps", "--json")
    (entry,) = json.loads(out)
    assert (entry["draftModel"], entry["draftMaxTokens"], entry["draftMinTokens"]) == (
        DRAFT, 8, 2)


@pytest.mark.parametrize(("flags", "message"), [
    (["--speculative-draft-max-tokens", "0"],
     "option '--speculative-draft-max-tokens' argument 0 is invalid"),
    (["--speculative-draft-min-tokens", "-1"],
     "option '--speculative-draft-min-tokens' argument -1 is invalid"),
    (["--speculative-draft-max-tokens", "2", "--speculative-draft-min-tokens", "3"],
     "'--speculative-draft-min-tokens' (3) must not be more than"),
    (["--speculative-draft-model", " "], "'--speculative-draft-model' must name a model"),
    (["--speculative-draft-max-tokens", "x"], "Invalid value for '--speculative-draft-max-tokens'"),
])
def test_bad_draft_flags_exit_1_before_any_server(home: Path, flags: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = lms(capsys, "load", "tiny-chat", *flags)
    assert code == 1 and out == ""
    assert message in err and "Traceback" not in err


def test_an_unknown_draft_model_exits_1(server: ThreadServer,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lms(capsys, "load", "tiny-chat", "--speculative-draft-model", "nope")
    assert code == 1
    assert "Draft model 'nope' not found. Run `lms ls` to see your models." in err
    assert server.models.loaded == {}


def test_stats_name_the_draft_model() -> None:
    stats = LlmPredictionStats("eosFound", used_draft_model_key=DRAFT,
                               total_draft_tokens_count=10, accepted_draft_tokens_count=5)
    lines = render.stats_lines(stats)
    at = lines.index(f"  Draft Model: {DRAFT}")
    assert lines[at + 1] == "  Accepted Draft Tokens: 5 of 10 (50%)"


def test_chat_drafts_within_the_loads_limits(server: ThreadServer, engine: RecordingEngine,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``lms chat`` asks for no draft lengths of its own (None on each request), so the
    load's hold: the second asking of a question drafts from the first answer."""
    monkeypatch.setattr("sys.stdin", Piped(""))
    code, _, err = lms(capsys, "load", "tiny-chat", "--speculative", "ngram",
                       "--speculative-draft-max-tokens", "3")
    assert code == 0, err
    for _ in range(2):
        code, out, err = lms(capsys, "chat", "tiny-chat", "-p", "Count [[count: 40]]",
                             "--stats")
        assert code == 0, err
    assert out.split() == [f"n{i}" for i in range(1, 41)]
    assert "  Accepted Draft Tokens: " in err
    request = engine.requests[-1]
    assert (request.speculative, request.draft_max, request.draft_min) == (None, None, None)
    assert engine.loads[-1].draft_max == 3
