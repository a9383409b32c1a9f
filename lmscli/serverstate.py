"""The files that say where the server is: read by clients, written by the server process.

``server.json`` holds the running server's pid, host and port and exists only while it runs;
``http-server-config.json`` remembers the last port (lms's precedence: flag, last used, 1234).
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


@dataclass
class ServerState:
    pid: int
    host: str
    port: int
    started_at: float

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


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
        state = ServerState(int(data["pid"]), str(data["host"]), int(data["port"]),
                            float(data.get("started_at", 0)))
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
