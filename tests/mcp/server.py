"""An MCP server for the tests, written with the official SDK's server side: run as
``python tests/mcp/server.py`` (stdio), ``… --http PORT`` (Streamable HTTP on loopback, at
/mcp) or ``… --sse PORT`` (the older HTTP+SSE transport, at /sse)."""

from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("lmscli-test")
NOTES = os.environ.get("NOTES_FILE", "notes.txt")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> str:
    """Add two integers and return the sum."""
    return str(a + b)


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def secret_word() -> str:
    """The secret word of the day."""
    return "pineapple"


@server.tool()
def write_note(text: str) -> str:
    """Append a line of text to the notes file."""
    with open(NOTES, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    return "Noted."


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def fail(reason: str) -> str:
    """Always fails, with the reason given."""
    raise ValueError(reason)


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def crash() -> str:
    """Ends the server's process in the middle of the call."""
    os._exit(3)


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def nap(seconds: float) -> str:
    """Sleeps, then answers."""
    time.sleep(seconds)
    return "awake"


if __name__ == "__main__":
    if "--http" in sys.argv:
        port = int(sys.argv[sys.argv.index("--http") + 1])
        server.run("streamable-http", host="127.0.0.1", port=port)
    elif "--sse" in sys.argv:  # the older transport, at /sse
        port = int(sys.argv[sys.argv.index("--sse") + 1])
        server.run("sse", host="127.0.0.1", port=port)
    else:
        server.run()
