"""``lms launch`` running the real coding agents, as their npm packages install them, with
their default settings, on Qwen2.5-Coder 0.5B behind a real server: each exits 0 and the
server refused none of their requests. The agents are installed once into the test cache;
where the npm registry can't be reached, these tests say so and skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE, QWEN_MODEL_REL, ProcessServer, link_model

pytestmark = pytest.mark.real
# the releases these tests were written against; a new one can change what it sends
PACKAGES = {"claude": "@anthropic-ai/claude-code@2.1.197", "codex": "@openai/codex@0.171.0",
            "opencode": "opencode-ai@1.18.33"}
NPM_PREFIX = MODEL_CACHE.parent / "npm"


@pytest.fixture(scope="module")
def agents_bin() -> Path:
    """A folder with the agents' commands, installed from npm the first time."""
    bin_dir = NPM_PREFIX / "node_modules/.bin"
    stamp = NPM_PREFIX / "installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == PACKAGES:
        return bin_dir
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the real coding agents can't be installed")
    NPM_PREFIX.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["npm", "install", "--prefix", str(NPM_PREFIX), "--no-audit",
                        "--no-fund", *PACKAGES.values()], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0 and any(s in r.stderr for s in ("ENOTFOUND", "EAI_AGAIN",
                                                         "ECONNREFUSED", "ETIMEDOUT")):
        pytest.skip(f"the npm registry can't be reached: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    stamp.write_text(json.dumps(PACKAGES))
    return bin_dir


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory,
                 qwen_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("agents-home")
    link_model(home, qwen_model_file, QWEN_MODEL_REL)
    server = ProcessServer(home)
    yield server
    server.stop()


def launch(server: ProcessServer, agents_bin: Path, tmp_path: Path, *args: str
           ) -> tuple[subprocess.CompletedProcess[str], float]:
    """``lms launch ARGS`` as a user runs it, in a git work tree, with a home of its own (the
    agents write their sessions there)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "util.py").write_text("def add(a, b):\n    return a + b\n")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = server.env | {"HOME": str(tmp_path), "PATH": f"{agents_bin}{os.pathsep}"
                        f"{os.environ['PATH']}"}
    for var in ("CLAUDE_CONFIG_DIR", "CODEX_HOME", "XDG_CONFIG_HOME"):
        env.pop(var, None)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lmscli", *args], capture_output=True,
                       text=True, env=env, cwd=work, stdin=subprocess.DEVNULL, timeout=1700)
    return r, time.monotonic() - start


def refused(server: ProcessServer) -> list[str]:
    """The requests the server refused, and any error it logged."""
    lines = (server.home / "server-test.log").read_text(errors="replace").splitlines()
    return [line for line in lines if " -> 4" in line or " -> 5" in line
            or "ERROR" in line or "Traceback" in line]


def test_codex_runs_on_the_local_model(agent_server: ProcessServer, agents_bin: Path,
                                       tmp_path: Path) -> None:
    r, took = launch(agent_server, agents_bin, tmp_path, "launch", "codex", "--", "exec",
                     "--skip-git-repo-check", "Say hello")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Starting Codex with qwen2.5-coder-0.5b-instruct" in r.stderr
    assert r.stdout.strip(), r.stderr[-2000:]  # codex exec prints the final answer
    assert refused(agent_server) == []
    print(f"codex exec took {took:.0f} s")


@pytest.mark.timeout(1800)  # its ~19k-token prompt: ~7 minutes on 2 cores, then turns from cache
def test_claude_code_runs_on_the_local_model(agent_server: ProcessServer, agents_bin: Path,
                                             tmp_path: Path) -> None:
    r, took = launch(agent_server, agents_bin, tmp_path, "launch", "claude", "--", "-p",
                     "Say hello", "--output-format", "json", "--max-turns", "8")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    result = json.loads(r.stdout)
    assert result["is_error"] is False and result["result"].strip()
    assert refused(agent_server) == []
    print(f"claude -p took {took:.0f} s")


def test_opencode_runs_on_the_local_model(agent_server: ProcessServer, agents_bin: Path,
                                          tmp_path: Path) -> None:
    r, took = launch(agent_server, agents_bin, tmp_path, "launch", "opencode", "--", "run",
                     "Say hello")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    # OpenCode names the agent and model it took (our provider's), then prints the answer
    assert "build · qwen2.5-coder-0.5b-instruct" in r.stderr and r.stdout.strip()
    assert refused(agent_server) == []
    print(f"opencode run took {took:.0f} s")
