"""``mcp.json``: ``{"mcpServers": {"NAME": {"command", "args", "env"} | {"url", "headers"}}}``,
as LM Studio and Cursor write it. Entries are checked when read; what lmscli doesn't use in an
entry is kept as it is."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscli import paths
from lmscli.errors import UserInputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: str | None = None  # stdio: the program and its arguments
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # Streamable HTTP (with SSE fallback)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "stdio" if self.command else "http"

    def target(self) -> str:
        """What it runs or reaches, for listings (header values left out: they hold keys)."""
        if self.command:
            return " ".join([self.command, *self.args])
        return str(self.url)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UserInputError(f"Invalid MCP server name {name[:80]!r}: use 1 to 64 letters, "
                             "digits, '.', '_' or '-', starting with a letter or digit.")
    return name


def read_file(path: Path | None = None) -> dict[str, Any]:
    """The whole file (``{}`` when there is none); a file that isn't JSON is an error."""
    path = path or paths.mcp_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserInputError(f"Cannot read {path}: {exc}",
                             hint="Fix the file, or move it away to start again.") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a JSON object with \"mcpServers\".")
    return data


def load(path: Path | None = None) -> list[ServerSpec]:
    servers = read_file(path).get("mcpServers", {})
    if not isinstance(servers, dict):
        raise UserInputError(f"\"mcpServers\" in {path or paths.mcp_file()} must be an object.")
    return [spec_of(name, entry) for name, entry in servers.items()]


def spec_of(name: str, entry: Any) -> ServerSpec:
    where = f"mcpServers.{name}"
    if not isinstance(entry, dict):
        raise UserInputError(f"{where} in mcp.json must be an object.")
    command, url = entry.get("command"), entry.get("url")
    if bool(command) == bool(url):
        raise UserInputError(f"{where} in mcp.json needs \"command\" (a program to run) or "
                             "\"url\" (a Streamable HTTP server), not both.")
    args, env, headers = entry.get("args", []), entry.get("env", {}), entry.get("headers", {})
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise UserInputError(f"{where}.args must be a list of strings.")
    for key, value in (("env", env), ("headers", headers)):
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise UserInputError(f"{where}.{key} must map names to strings.")
    if command is not None and not isinstance(command, str):
        raise UserInputError(f"{where}.command must be a string.")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://",
                                                                          "https://"))):
        raise UserInputError(f"{where}.url must be an http:// or https:// URL.")
    return ServerSpec(name, command, list(args), dict(env), url, dict(headers))


def find(names: list[str], path: Path | None = None) -> list[ServerSpec]:
    """The servers called ``names`` (``all``: every one), in the file's order."""
    specs = load(path)
    if "all" in names:
        return specs
    by_name = {s.name: s for s in specs}
    missing = [n for n in names if n not in by_name]
    if missing:
        known = ", ".join(by_name) or "none yet (lms mcp add NAME -- COMMAND …)"
        raise UserInputError(f"No MCP server called {missing[0]!r} in "
                             f"{path or paths.mcp_file()}. Configured: {known}")
    return [by_name[n] for n in dict.fromkeys(names)]


def add(spec: ServerSpec, path: Path | None = None) -> None:
    """Add or replace one server; the rest of the file stays as it was."""
    path = path or paths.mcp_file()
    data = read_file(path)
    servers = data.setdefault("mcpServers", {})
    entry: dict[str, Any] = {"command": spec.command, "args": spec.args} if spec.command \
        else {"url": spec.url}
    if spec.env:
        entry["env"] = spec.env
    if spec.headers:
        entry["headers"] = spec.headers
    servers[check_name(spec.name)] = entry
    paths.write_atomically(path, json.dumps(data, indent=2) + "\n")


def remove(name: str, path: Path | None = None) -> None:
    path = path or paths.mcp_file()
    data = read_file(path)
    servers = data.get("mcpServers", {})
    if not isinstance(servers, dict) or name not in servers:
        raise UserInputError(f"No MCP server called {name!r} in {path}.")
    del servers[name]
    paths.write_atomically(path, json.dumps(data, indent=2) + "\n")
