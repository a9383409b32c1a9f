"""Starting the server as a background process and waiting until it answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import httpx

from lmscli import paths, serverstate
from lmscli.client.transport import auth_headers
from lmscli.errors import ExitCode, LMSError, UserInputError

START_TIMEOUT_S = 30.0


def greeting_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    # the standard library's client: every command asks this first, and an httpx client
    # would first build a TLS context that a plain-HTTP local server never uses
    import http.client
    import json

    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/lmstudio-greeting")
        response = connection.getresponse()
        body = json.loads(response.read(4096) or b"null")
        return response.status == 200 and isinstance(body, dict) and body.get("lmstudio") is True
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        connection.close()


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


def start_server(port: int, host: str, cors: bool = False, *, api_key: str | None = None,
                 allowed_hosts: Sequence[str] = (), max_body_mb: float | None = None,
                 allow_unauthenticated: bool = False, parallel: int | None = None,
                 max_queue: int | None = None, cache_ram: int | None = None,
                 cache_dir: str | None = None, cache_disk: int | None = None,
                 allow_local_mcp: bool = False) -> serverstate.ServerState:
    """Spawn ``python -m lmscli.server`` detached; return once it answers the greeting.
    Without ``api_key`` the server takes LMS_API_KEY (or LM_API_TOKEN) from the environment."""
    log_path = paths.server_log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", serverstate.SERVER_MODULE, "--host", host, "--port", str(port)]
    cmd += ["--cors"] if cors else []
    cmd += ["--allow-unauthenticated"] if allow_unauthenticated else []
    cmd += ["--allow-local-mcp"] if allow_local_mcp else []
    cmd += [arg for h in allowed_hosts for arg in ("--allowed-host", h)]
    cmd += ["--max-body-mb", str(max_body_mb)] if max_body_mb is not None else []
    cmd += ["--parallel", str(parallel)] if parallel is not None else []
    cmd += ["--max-queue", str(max_queue)] if max_queue is not None else []
    for flag, value in (("--cache-ram", cache_ram), ("--cache-dir", cache_dir),
                        ("--cache-disk", cache_disk)):
        cmd += [flag, str(value)] if value is not None else []
    env = os.environ.copy()
    if api_key:
        env[serverstate.API_KEY_ENVS[0]] = api_key  # not in argv, which every user can read
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=env)
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
    if code == ExitCode.PORT_IN_USE:
        return UserInputError(
            f"Port {port} is already in use by another program.",
            hint=f"Stop that program, or pick another port: lms server start --port {port + 1}")
    detail = _log_tail(log_path)
    return LMSError(f"The server exited while starting (code {code})"
                    + (f": {detail}" if detail else "."), hint=f"See the server log: {log_path}")


def verified_server() -> serverstate.ServerState | None:
    """The server of the state file, if its pid really is that server; a stale file (the pid
    now another process, or nothing answering) is removed and None returned."""
    state = serverstate.read_state()
    if state is None:
        return None
    # a known start time pins the process down even when it is too busy to answer
    pinned = state.proc_start is not None and serverstate.process_start(state.pid) is not None
    if serverstate.is_server_process(state) and (
            pinned or greeting_ok(state.client_host, state.port)):
        return state
    serverstate.clear_state(state.pid)
    return None


def stop_server(state: serverstate.ServerState, timeout: float = 15.0) -> None:
    """Stop a server that ``verified_server`` returned and wait for its process to end:
    politely over HTTP, else (no key, or no answer) with SIGTERM, at last SIGKILL."""
    if not _ask_shutdown(state):
        _signal(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and serverstate.pid_alive(state.pid):
        time.sleep(0.05)
    if serverstate.pid_alive(state.pid):
        _signal(state.pid, signal.SIGKILL)
    serverstate.clear_state(state.pid)


def _ask_shutdown(state: serverstate.ServerState) -> bool:
    try:
        r = httpx.post(f"http://{state.client_host}:{state.port}/lmscli/shutdown", json={},
                       headers=auth_headers(), timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended meanwhile
    except PermissionError as exc:
        raise LMSError(f"Not allowed to stop the server process {pid}: it belongs to another "
                       "user.") from exc
