"""The lms commands in process against a real server thread running the fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmscli.cli.app import run
from tests.conftest import ThreadServer


def lms(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ls_table_json_and_loaded_marker(fake_server: ThreadServer, capsys) -> None:
    code, out, _ = lms(capsys, "ls")
    assert code == 0
    assert "You have 3 models" in out
    header = next(line for line in out.splitlines() if line.startswith("LLM"))
    assert header.split() == ["LLM", "PARAMS", "ARCH", "SIZE", "DEVICE"]
    assert "✓ LOADED" not in out
    lms(capsys, "load", "tiny-chat")
    code, out, _ = lms(capsys, "ls")
    row = next(line for line in out.splitlines() if line.startswith("tiny-chat "))
    assert row.rstrip().endswith("✓ LOADED")
    code, out, _ = lms(capsys, "ls", "--json")
    data = json.loads(out)
    assert {m["modelKey"] for m in data} == {"tiny-chat", "tiny-chat-large", "other-model"}
    assert out.count("\n") == 1


def test_ls_without_models_and_with_filter(home: Path, capsys) -> None:
    code, out, err = lms(capsys, "ls")
    assert code == 0 and "You have not downloaded any models yet." in out
    assert "lms get smollm2-135m-instruct" in err
    code, out, _ = lms(capsys, "ls", "--embedding", "--json")
    assert json.loads(out) == []


def test_ls_is_fast_over_twenty_models(home: Path, capsys) -> None:
    import time

    from tests.gguf_factory import make_gguf

    for i in range(20):
        make_gguf(home / f"models/bulk/m{i}-GGUF/m{i}.Q4_0.gguf", n_params=2_000_000_000)
    lms(capsys, "ls")  # first scan fills the metadata cache
    started = time.perf_counter()
    code, out, _ = lms(capsys, "ls")
    assert code == 0 and "You have 20 models" in out
    assert time.perf_counter() - started < 0.5


def test_load_ps_unload_flow(fake_server: ThreadServer, capsys) -> None:
    code, out, err = lms(capsys, "load", "tiny-chat", "--ttl", "600", "-c", "128")
    assert code == 0, err
    assert "Model loaded successfully in" in err
    assert 'use the identifier "tiny-chat"' in err
    assert out == ""
    code, _, err = lms(capsys, "load", "tiny-chat")
    assert code == 0 and "already loaded" in err
    code, out, _ = lms(capsys, "ps")
    lines = out.splitlines()
    assert lines[0].split() == ["IDENTIFIER", "MODEL", "STATUS", "SIZE", "CONTEXT", "PARALLEL",
                                "DEVICE", "TTL"]
    assert "IDLE" in lines[1] and "128" in lines[1] and "10m / 10m" in lines[1]
    code, out, _ = lms(capsys, "ps", "--json")
    (entry,) = json.loads(out)
    assert entry["identifier"] == "tiny-chat" and entry["status"] == "idle"
    assert entry["queued"] == 0 and entry["contextLength"] == 128
    code, _, err = lms(capsys, "load", "tiny-chat", "--identifier", "second")
    assert code == 0 and '"second"' in err
    code, _, err = lms(capsys, "unload")
    assert code == 1 and "2 models are loaded" in err
    code, _, err = lms(capsys, "unload", "second")
    assert code == 0 and 'Model "second" unloaded.' in err
    code, _, err = lms(capsys, "unload", "nope")
    assert code == 0 and "Model Not Found" in err  # lms's exit code for this case
    code, _, err = lms(capsys, "unload", "--all")
    assert code == 0 and "Unloaded 1 model." in err
    code, _, err = lms(capsys, "unload")
    assert code == 1 and "don't have any models loaded" in err
    code, out, err = lms(capsys, "ps")
    assert code == 0 and "No models are currently loaded." in err and out == ""


def test_load_resolution_without_a_tty(fake_server: ThreadServer, capsys) -> None:
    code, _, err = lms(capsys, "load", "tiny")
    assert code == 1
    assert "tiny-chat" in err and "tiny-chat-large" in err  # candidates are listed
    code, _, err = lms(capsys, "load", "nothing-like-it")
    assert code == 1 and "No model matching" in err and "other-model" in err
    code, _, err = lms(capsys, "load", "othr")  # one fuzzy match loads without asking
    assert code == 0 and '"other-model"' in err
    code, _, err = lms(capsys, "load", "tiny", "-y")
    assert code == 0 and "2 models match" in err
    code, _, err = lms(capsys, "load", "--exact", "test/tiny-chat-large-GGUF/nope.gguf")
    assert code == 1 and "lms load --exact" in err


def test_load_recent_models_come_first(fake_server: ThreadServer, capsys) -> None:
    lms(capsys, "load", "tiny-chat-large")
    lms(capsys, "unload", "--all")
    code, _, err = lms(capsys, "load", "tiny", "-y")
    assert '"tiny-chat-large"' in err


def test_load_flag_errors(fake_server: ThreadServer, capsys) -> None:
    code, _, err = lms(capsys, "load", "tiny-chat", "--gpu", "abc")
    assert code == 1 and "Not a number" in err
    code, _, err = lms(capsys, "load", "tiny-chat", "-c", "0")
    assert code == 1 and "context-length" in err
    code, _, err = lms(capsys, "load", "--bogus")
    assert code == 1 and "No such option" in err and "Traceback" not in err


def test_an_identifier_in_link_syntax_is_one_line_error(fake_server: ThreadServer,
                                                        capsys) -> None:
    code, out, err = lms(capsys, "load", "tiny-chat", "--identifier", "gpu/tiny")
    assert code == 1 and out == ""
    assert err.strip() == ("Error: Invalid identifier 'gpu/tiny': '/' and '..' are kept "
                           "for linked models (LINK/model). Use another, such as 'gpu-tiny'.")
    code, out, _ = lms(capsys, "ps", "--json")
    assert json.loads(out) == []


def test_status_commands(fake_server: ThreadServer, capsys) -> None:
    code, out, err = lms(capsys, "server", "status")
    assert code == 0 and f"running on port {fake_server.port}" in err and out == ""
    code, out, _ = lms(capsys, "server", "status", "--json")
    assert json.loads(out) == {"running": True, "port": fake_server.port}
    code, out, _ = lms(capsys, "status")
    assert f"Server: ON (port: {fake_server.port})" in out and "No Models Loaded" in out


def test_no_server(home: Path, capsys) -> None:
    # as lms: `server status` exits 0 either way; scripts read "running" from --json
    code, out, err = lms(capsys, "server", "status")
    assert code == 0 and out == "" and "The server is not running." in err
    code, out, _ = lms(capsys, "server", "status", "--json")
    assert code == 0 and json.loads(out) == {"running": False}
    code, _, err = lms(capsys, "server", "stop")
    assert code == 1 and "The server is not running." in err
    code, out, err = lms(capsys, "ps", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, err = lms(capsys, "status")
    assert "Server:  OFF" in out and "lms server start" in out


def test_import_rejects_non_gguf_and_moves_gguf(home: Path, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "notes.gguf"
    junk.write_text("hello")
    code, _, err = lms(capsys, "import", str(junk), "-y")
    assert code == 1 and "not a GGUF" in err and "Traceback" not in err
    from tests.gguf_factory import make_gguf

    src = make_gguf(tmp_path / "dl/my-model.Q4_0.gguf")
    code, _, err = lms(capsys, "import", str(src), "--user-repo", "me/mine", "--copy")
    assert code == 0 and "File copied to" in err
    assert (home / "models/me/mine/my-model.Q4_0.gguf").exists() and src.exists()
    code, _, err = lms(capsys, "import", str(src), "--user-repo", "me/mine", "-c", "-l")
    assert code == 1 and "Only one of" in err


def test_get_unknown_name(home: Path, capsys) -> None:
    code, _, err = lms(capsys, "get", "no-such-builtin")
    assert code == 1 and "smollm2-135m-instruct" in err and "Traceback" not in err


def test_version_and_no_args(capsys) -> None:
    code, out, _ = lms(capsys, "version", "--json")
    assert json.loads(out)["version"]
    env = os.environ | {"NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "lmscli"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1 and "Usage" in r.stderr and "Usage" not in r.stdout


def test_help_and_ps_do_not_import_heavy_modules() -> None:
    code = ("import sys; from lmscli.cli.app import run; run(['ps']); run(['--help']); "
            "heavy = [m for m in ('llama_cpp', 'uvicorn', 'starlette', 'huggingface_hub', "
            "'jinja2', 'httpx') if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_completions_are_up_to_date() -> None:
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "completions/generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_load_completion_reads_the_models_folder(fake_models: Path) -> None:
    # no server runs: the keys come from disk
    env = os.environ | {"_LMS_COMPLETE": "complete_bash", "COMP_WORDS": "lms load tiny",
                        "COMP_CWORD": "2"}
    r = subprocess.run([sys.executable, "-m", "lmscli"], capture_output=True, text=True,
                       env=env, timeout=20)
    assert r.stdout.split() == ["tiny-chat", "tiny-chat-large"]
