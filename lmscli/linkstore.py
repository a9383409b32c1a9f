"""Linked engines as configured: names, URLs and keys, validated and kept on disk.

Standard library only, so that the CLI can check a name or URL before it starts a server, and
the server can persist what ``lms link add`` sent. The file lives with the server's other
state (``paths.links_file()``) and is written mode 0600: it may hold API keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from lmscli import paths

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_URL_CHARS = 2000


class LinkConfigError(ValueError):
    """A name or URL that cannot be a link; the message says why, in one line."""


@dataclass(frozen=True)
class LinkConfig:
    name: str
    url: str  # normalised: scheme://host[:port]/path, the OpenAI base (…/v1), no trailing /
    api_key: str | None = None

    def public(self) -> dict[str, object]:
        """What may be shown: everything but the key."""
        return {"name": self.name, "url": self.url, "hasApiKey": bool(self.api_key)}


def check_name(name: str) -> str:
    # a slash would make ``NAME/model`` ambiguous; spaces and odd characters break tables
    if not NAME_RE.fullmatch(name):
        raise LinkConfigError(
            f"Invalid link name {name[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.")
    return name


def identifier_clash(identifier: str) -> str | None:
    """Why a model identifier would read as a linked model's name, or None: ``LINK/model``
    reaches a link's model, so a local ``a/b`` would shadow link a's model b (and ``..``
    reads as a path)."""
    if "/" not in identifier and ".." not in identifier:
        return None
    instead = re.sub(r"\.{2,}", ".", identifier.replace("/", "-"))
    return (f"Invalid identifier {identifier[:80]!r}: '/' and '..' are kept for linked "
            f"models (LINK/model). Use another, such as {instead[:80]!r}.")


def normalise_url(url: str) -> str:
    """``http://h:8000`` → ``http://h:8000/v1``; a URL with a path keeps it (``…/v1``,
    or a proxy's own prefix). Credentials, queries and fragments are refused: a key goes in
    ``--api-key``, where it is never shown."""
    text = url.strip()
    if not text or len(text) > MAX_URL_CHARS or not text.isprintable():
        raise LinkConfigError("Invalid link URL: give the engine's address, such as "
                              "http://gpu-box:8000 or http://gpu-box:8000/v1.")
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise LinkConfigError(f"Invalid link URL {text[:100]!r}: it must start with http:// "
                              "or https:// and name a host, such as http://gpu-box:8000.")
    if parts.username or parts.password:
        raise LinkConfigError("Invalid link URL: leave credentials out of it and pass the key "
                              "with --api-key.")
    if parts.query or parts.fragment:
        raise LinkConfigError(f"Invalid link URL {text[:100]!r}: it must not have a query or "
                              "a fragment.")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise LinkConfigError(f"Invalid link URL {text[:100]!r}: the port must be a number "
                              "from 1 to 65535.") from None
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, "", ""))


def load(path: Path | None = None) -> list[LinkConfig]:
    """The saved links; a missing or unreadable file is no links (the server must start)."""
    path = path or paths.links_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for item in data.get("links", []) if isinstance(data, dict) else []:
        try:
            out.append(LinkConfig(check_name(str(item["name"])), normalise_url(str(item["url"])),
                                  item.get("api_key") or None))
        except (KeyError, TypeError, LinkConfigError):
            continue  # one hand-edited entry gone wrong must not lose the others
    return out


def save(links: list[LinkConfig], path: Path | None = None) -> None:
    """Write atomically, readable by the owner only (it may hold API keys)."""
    path = path or paths.links_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"links": [{"name": link.name, "url": link.url}
                      | ({"api_key": link.api_key} if link.api_key else {})
                      for link in links]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o600)  # O_CREAT's mode only applies to a file it creates
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
