"""Starting the server as a background process and waiting until it answers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx

from lmscli import paths, serverstate
from lmscli.errors import LMSError, UserInputError

START_TIMEOUT_S = 30.0
EXIT_PORT_IN_USE = 3  # lmscli.server.run's code; not imported, to keep uvicorn out


def greeting_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        r = httpx.get(f"http://{host}:{port}/lmstudio-greeting", timeout=timeout)
        return r.status_code == 200 and r.json().get("lmstudio") is True
    except (httpx.HTTPError, ValueError):
        return False


def running_server() -> serverstate.ServerState | None:
    """The lmscli server that answers, per the state file; None when there is none."""
    state = serverstate.read_state()
    if state and greeting_ok(state.client_host, state.port):
        return state
    return None


def _log_tail(log_path: str) -> str:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def start_server(port: int, host: str, cors: bool = False) -> serverstate.ServerState:
    """Spawn ``python -m lmscli.server`` detached; return once it answers the greeting."""
    log_path = paths.server_log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lmscli.server", "--host", host, "--port", str(port)]
    if cors:
        cmd.append("--cors")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=os.environ.copy())
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise _start_failure(code, port, str(log_path))
        state = serverstate.read_state()
        if state and state.pid == proc.pid and greeting_ok(client_host, port):
            return state
        time.sleep(0.05)
    proc.kill()
    raise LMSError("Failed to verify the server is running. Please try to use another port.",
                   hint=f"See the server log: {log_path}")


def _start_failure(code: int, port: int, log_path: str) -> LMSError:
    if code == EXIT_PORT_IN_USE:
        return UserInputError(
            f"Port {port} is already in use by another program.",
            hint=f"Stop that program, or pick another port: lms server start --port {port + 1}")
    detail = _log_tail(log_path)
    return LMSError(f"The server exited while starting (code {code})"
                    + (f": {detail}" if detail else "."), hint=f"See the server log: {log_path}")


def stop_server(state: serverstate.ServerState, timeout: float = 15.0) -> None:
    """Ask the server to shut down and wait for its process to end."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"http://{state.client_host}:{state.port}/lmscli/shutdown", timeout=5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and serverstate.pid_alive(state.pid):
        time.sleep(0.05)
    if serverstate.pid_alive(state.pid):
        os.kill(state.pid, 9)
    serverstate.clear_state(state.pid)
