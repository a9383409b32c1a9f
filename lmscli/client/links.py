"""Linked engines on a server (``lms link``): list, add, remove. The server keeps the keys;
nothing it answers contains one."""

from __future__ import annotations

from typing import Any, Protocol

from lmscli.client.transport import Transport


class Connected(Protocol):
    """What these calls need of a client: its transport. ``Client`` is one; naming it would
    put this module above client.py and the model handles it imports, for no use."""

    @property
    def transport(self) -> Transport: ...


def list_links(client: Connected, *, refresh: bool = False) -> list[dict[str, Any]]:
    """Each link with its models and whether it answered; ``refresh`` asks every link for
    its models first (at most a few seconds)."""
    params = {"refresh": "true"} if refresh else None
    return client.transport.request("GET", "/lmscli/links", params=params)["links"]


def add_link(client: Connected, name: str, url: str, api_key: str | None = None
             ) -> dict[str, Any]:
    body = {"name": name, "url": url} | ({"api_key": api_key} if api_key else {})
    return client.transport.post("/lmscli/links", body)["link"]


def remove_link(client: Connected, name: str) -> None:
    client.transport.post("/lmscli/links/remove", {"name": name})
