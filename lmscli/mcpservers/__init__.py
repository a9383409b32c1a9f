"""Tools from MCP servers (``mcp.json``, LM Studio's format) for ``lms act``, ``lms mcp`` and
``act()``.

``config`` reads and edits the file (standard library only); ``servers`` runs the sessions
with the official ``mcp`` SDK, imported only when a server starts, so that ``lms --help`` and
``lms ps`` never pay for it. (Not called ``lmscli.mcp``: ``lms.mcp("NAME")`` is the SDK-style
way to name a server.)
"""

from __future__ import annotations

from typing import Any


def mcp(name: str) -> Any:
    """The MCP server called ``name`` in mcp.json, for ``model.act(chat, [..., lms.mcp(name)])``
    (or ``with lms.mcp(name) as server:``); it starts when act() first asks for its tools."""
    from lmscli.mcpservers.config import find
    from lmscli.mcpservers.servers import McpServer

    return McpServer(find([name])[0])
