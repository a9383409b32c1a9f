"""CLI preferences (lms's cli-pref.json): most recently loaded models first."""

from __future__ import annotations

import json

from lmscli import paths

MAX_RECENT = 20


def _read() -> dict:
    try:
        data = json.loads(paths.cli_pref_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict) -> None:
    paths.write_atomically(paths.cli_pref_file(), json.dumps(data))


def last_loaded() -> list[str]:
    recent = _read().get("lastLoadedModels")
    return [k for k in recent if isinstance(k, str)] if isinstance(recent, list) else []


def remember_loaded(model_key: str) -> None:
    data = _read()
    recent = [model_key] + [k for k in last_loaded() if k != model_key]
    data["lastLoadedModels"] = recent[:MAX_RECENT]
    _write(data)
