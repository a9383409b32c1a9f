"""``integrations`` on ``/api/v1/chat``: MCP servers whose tools the server runs for the model,
as LM Studio does. ``{"type": "plugin", "id": "mcp/NAME"}`` (or just ``"mcp/NAME"``) is a
server of mcp.json; ``{"type": "ephemeral_mcp", "server_label", "server_url", "headers"}`` one
named in the request, refused at a loopback or private address unless the server was started
with ``--allow-local-mcp`` (a request must not reach into this machine's network).
``allowed_tools`` narrows either. mcp.json's servers start once and are kept while used; a
request's own end with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lmscli.errors import LMSError
from lmscli.server.body import Body
from lmscli.server.errors import APIError, bad_request

MAX_INTEGRATIONS = 8
MAX_TOOL_ROUNDS = 8  # rounds of tool calls before the model must answer


def mcp_error(message: str) -> APIError:
    return APIError(400, message, param="integrations", code="mcp_connection_error")


@dataclass
class Integration:
    """One integration: the server to start, the tools it may offer, and how output items
    name it (``provider_info``)."""

    spec: Any  # mcpservers.config.ServerSpec
    allowed: set[str] | None
    provider_info: dict[str, str]
    where: str = ""  # the integration's place in the request, for errors
    public_only: bool = False  # an ephemeral server must be at a public address
    server: Any = None  # McpServer, once started
    tools: dict[str, Any] = field(default_factory=dict)  # offered name -> callable


def parse(body: Body, allow_local: bool) -> list[Integration]:
    """The request's integrations, checked before anything starts."""
    raw = body.get("integrations", list, [])
    if len(raw) > MAX_INTEGRATIONS:
        raise bad_request(f"At most {MAX_INTEGRATIONS} integrations.", "integrations")
    return [integration(item, f"integrations[{i}]", allow_local) for i, item in enumerate(raw)]


def integration(item: Any, where: str, allow_local: bool) -> Integration:
    from lmscli.mcpservers import config

    if isinstance(item, str):
        item = {"type": "plugin", "id": item}
    entry = Body(item, where)
    kind = entry.get("type", str, required=True)
    allowed = entry.get("allowed_tools", list)
    if allowed is not None and not all(isinstance(t, str) for t in allowed):
        raise bad_request(f"'{where}.allowed_tools' must be a list of tool names.",
                          f"{where}.allowed_tools")
    names = set(allowed) if allowed is not None else None
    if kind == "plugin":
        plugin = entry.text("id", required=True, max_chars=200) or ""
        if not plugin.startswith("mcp/"):
            raise APIError(400, f"lmscli has no plugins; '{where}.id' can name an MCP server "
                           "of mcp.json as mcp/NAME.", param=f"{where}.id",
                           code="not_implemented")
        try:
            (spec,) = config.find([plugin.removeprefix("mcp/")])
        except LMSError as exc:
            raise APIError(400, exc.message, param=f"{where}.id",
                           code="plugin_connection_error") from None
        return Integration(spec, names, {"type": "plugin", "plugin_id": plugin})
    if kind != "ephemeral_mcp":
        raise bad_request(f"'{where}.type' must be plugin or ephemeral_mcp.", f"{where}.type")
    label = entry.text("server_label", required=True, max_chars=64) or ""
    url = entry.text("server_url", required=True, max_chars=2000) or ""
    headers = entry.get("headers", dict, {})
    if not all(isinstance(v, str) for v in headers.values()):
        raise bad_request(f"'{where}.headers' must map names to strings.", f"{where}.headers")
    try:
        spec = config.spec_of(label, {"url": url, "headers": headers})
        config.check_name(label)
    except LMSError as exc:
        raise bad_request(exc.message.replace("mcpServers.", f"{where}: "), where) from None
    return Integration(spec, names, {"type": "ephemeral_mcp", "server_label": label}, where,
                  public_only=not allow_local)


def check_public(url: str, where: str) -> None:
    """A 403 for a URL whose host is, or resolves to, a loopback, private, link-local or
    otherwise non-public address (it looks the name up: run it off the event loop)."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise mcp_error(f"The MCP server {host} in {where} could not be found.") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise APIError(403, f"The MCP server at {host} ({ip}) is not at a public address; "
                           "this server was not started to allow that (lms server start "
                           "--allow-local-mcp).", param=f"{where}.server_url",
                           code="forbidden_mcp_address")


class Pool:
    """The servers of mcp.json that requests used: started once and kept while used (a
    server unused for IDLE_S ends at the next request, and all end with lmscli)."""

    IDLE_S = 600.0

    def __init__(self) -> None:
        # the entry as mcp.json has it now -> (McpServer, last used): an edited entry is a
        # new server
        self.running: dict[str, tuple[Any, float]] = {}
        self.lock = asyncio.Lock()

    async def get(self, spec: Any) -> Any:
        from lmscli.mcpservers.servers import McpServer

        wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        async with self.lock:
            now = time.monotonic()
            for key, (server, used) in list(self.running.items()):
                idle = key != wanted and now - used > self.IDLE_S
                if idle or not server.lms_running:
                    del self.running[key]
                    await asyncio.to_thread(server.close)
            server = self.running.get(wanted, (None, 0.0))[0]
            if server is None:
                server = await asyncio.to_thread(McpServer(spec).start)
            self.running[wanted] = (server, now)
            return server


    async def aclose(self) -> None:
        """At shutdown: every server ends (a stdio server's process too)."""
        running, self.running = self.running, {}
        for server, _ in running.values():
            await asyncio.to_thread(server.close)


class Toolset:
    """The started servers of one request: their tools as OpenAI chat tools, and calls.
    mcp.json's servers come from the ``pool``; a request's own (ephemeral) ones end with it."""

    def __init__(self, sources: list[Integration], pool: Pool) -> None:
        self.sources = sources
        self.pool = pool
        self.by_name: dict[str, Integration] = {}

    async def _server(self, src: Integration) -> Any:
        from lmscli.mcpservers.servers import McpServer

        if src.provider_info["type"] == "plugin":
            return await self.pool.get(src.spec)
        if src.public_only:
            await asyncio.to_thread(check_public, src.spec.url, src.where)
        server = await asyncio.to_thread(McpServer(src.spec).start)
        src.server = server  # closed with the request
        return server

    async def start(self) -> None:
        from lmscli.mcpservers.servers import McpError

        for src in self.sources:
            try:
                server = await self._server(src)
            except McpError as exc:
                await self.close()
                raise mcp_error(exc.message) from None
            except APIError:
                await self.close()
                raise
            for fn in server.callables(self.by_name):
                original = fn.lms_source_tool
                if src.allowed is None or original in src.allowed:
                    src.tools[fn.__name__] = fn
                    self.by_name[fn.__name__] = src

    def openai_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {
            "name": name, "description": fn.__doc__ or "", "parameters": fn.lms_parameters}}
            for src in self.sources for name, fn in src.tools.items()]

    async def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The output item for one call: ``tool_call`` with the output, or
        ``invalid_tool_call`` for a tool that was not offered."""
        src = self.by_name.get(name)
        if src is None:
            return {"type": "invalid_tool_call", "reason": f"Tool {name} was not offered.",
                    "metadata": {"type": "invalid_name", "tool_name": name,
                                 "arguments": arguments}}
        output = await asyncio.to_thread(lambda: src.tools[name](**arguments))
        return {"type": "tool_call", "tool": name, "arguments": arguments, "output": output,
                "provider_info": src.provider_info}

    async def close(self) -> None:
        for src in self.sources:
            if src.server is not None:
                await asyncio.to_thread(src.server.close)


def tool_message(call_id: str, item: dict[str, Any]) -> dict[str, Any]:
    """A call's result as the chat message the next round reads."""
    output = item.get("output", item.get("reason", ""))
    return {"role": "tool", "tool_call_id": call_id,
            "content": output if isinstance(output, str) else json.dumps(output)}
