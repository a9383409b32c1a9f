"""The files that say where the server is: read by clients, written by the server process.

``server.json`` holds the running server's pid, host and port and exists only while it runs;
``http-server-config.json`` remembers the last port (lms's precedence: flag, last used, 1234).
The API key is never written down: clients and the server read it from the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lmscli import paths

DEFAULT_PORT = 1234
DEFAULT_HOST = "127.0.0.1"
# lmscli's name first; LM Studio calls its token LM_API_TOKEN, so that works too
API_KEY_ENVS = ("LMS_API_KEY", "LM_API_TOKEN")
SERVER_MODULE = "lmscli.server"


@dataclass
class ServerState:
    pid: int
    host: str
    port: int
    started_at: float
    # the process's start time in clock ticks since boot (Linux): a pid reused by another
    # process after the server died has another start time
    proc_start: int | None = None

    @property
    def client_host(self) -> str:
        # a wildcard bind is reached on loopback
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    paths.write_atomically(path, json.dumps(data))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state() -> ServerState | None:
    """The running server's state, or None; a file left by a killed server is removed."""
    data = _read_json(paths.server_state_file())
    if data is None:
        return None
    try:
        start = data.get("proc_start")
        state = ServerState(int(data["pid"]), str(data["host"]), int(data["port"]),
                            float(data.get("started_at", 0)),
                            int(start) if start is not None else None)
    except (KeyError, TypeError, ValueError):
        clear_state()
        return None
    if not pid_alive(state.pid):
        clear_state()
        return None
    return state


def write_state(state: ServerState) -> None:
    _write_json(paths.server_state_file(), asdict(state))
    _write_json(paths.server_config_file(), {"port": state.port})


def clear_state(pid: int | None = None) -> None:
    """Remove the state file; with ``pid``, only if it is still that process's."""
    path = paths.server_state_file()
    if pid is not None:
        data = _read_json(path)
        if data is not None and data.get("pid") != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def last_port() -> int:
    data = _read_json(paths.server_config_file())
    port = data.get("port") if data else None
    return port if isinstance(port, int) and 0 < port < 65536 else DEFAULT_PORT


def config_exists() -> bool:
    return paths.server_config_file().exists()


def default_host() -> str:
    return os.environ.get("LMS_SERVER_HOST") or DEFAULT_HOST


def env_api_key() -> str | None:
    """The API key the user gave in the environment, for the server and its clients."""
    for name in API_KEY_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


# -- is this pid really the server? ---------------------------------------------------------

def _proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None without Linux's /proc."""
    stat = _proc(pid, "stat")
    if stat is None:
        return None
    # field 2, the command name in parentheses, may itself hold spaces and parentheses
    fields = stat.rpartition(b")")[2].split()
    try:
        return int(fields[19])  # field 22 of proc(5)
    except (IndexError, ValueError):
        return None


def is_server_command(argv: list[str]) -> bool:
    """``python -m lmscli.server ...`` (what ``lms server start`` spawns), or
    ``lms server start --foreground``, which serves in the lms process itself."""
    if SERVER_MODULE in argv:
        return True
    return "--foreground" in argv and "server" in argv and "start" in argv


def is_server_process(state: ServerState) -> bool:
    """Whether ``state.pid`` is still the server process that wrote ``state``: an lmscli
    server by its command line, started when the state says. Without /proc (not Linux) only
    liveness can be told; callers then rely on the port's greeting."""
    if not pid_alive(state.pid):
        return False
    if not Path("/proc/self/cmdline").exists():
        return True
    cmdline = _proc(state.pid, "cmdline")
    if cmdline is None:
        return False
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if not is_server_command(argv):
        return False
    return state.proc_start is None or process_start(state.pid) == state.proc_start
