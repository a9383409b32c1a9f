"""Every path lmscli reads or writes, in one place.

Precedence: ``LMSCLI_HOME`` (everything lives under it, tests use a temp dir), else the
platformdirs user data folder. ``LMSCLI_MODELS_DIR`` moves only the models folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, so that a reader never
    sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def home() -> Path:
    override = os.environ.get("LMSCLI_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return platformdirs.user_data_path("lmscli", appauthor=False)


def models_dir() -> Path:
    override = os.environ.get("LMSCLI_MODELS_DIR")
    return Path(override).expanduser() if override else home() / "models"


def internal_dir() -> Path:
    return home() / ".internal"


def server_state_file() -> Path:
    """Pid, port and bind of the running server, written by the server process."""
    return internal_dir() / "server.json"


def server_config_file() -> Path:
    """The last port the server was started on (persisted like lms's http-server-config.json)."""
    return internal_dir() / "http-server-config.json"


def links_file() -> Path:
    """The server's linked engines (``lms link``); holds API keys, so it is mode 0600."""
    return internal_dir() / "links.json"


def mcp_file() -> Path:
    """MCP servers, in LM Studio's (and Cursor's) mcp.json format; the user edits it too."""
    return home() / "mcp.json"


def server_log_file() -> Path:
    return internal_dir() / "server.log"


def cli_pref_file() -> Path:
    return internal_dir() / "cli-pref.json"


def metadata_cache_file() -> Path:
    return internal_dir() / "gguf-metadata-cache.json"


def prompt_cache_dir() -> Path:
    """Saved prompt states (KV caches), kept across server restarts."""
    return home() / "prompt-cache"


def chat_history_file() -> Path:
    return home() / "chat-history"


def downloads_tmp_dir() -> Path:
    return internal_dir() / "downloads"
