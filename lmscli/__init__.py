"""lmscli: a local-LLM toolkit modelled on LM Studio's lms.

``import lmscli as lms`` gives LM Studio's Python SDK surface (``lms.llm()``, ``lms.Chat``,
``respond``, ``respond_stream``, ...). It is loaded on first use, so that the ``lms`` command
and the server do not pay for it.
"""

from typing import Any

__version__ = "0.1.0"


# ``from lmscli import <submodule>`` asks for the attribute first: those must not load the SDK
_SUBMODULES = {"catalog", "cli", "client", "engine", "errors", "linkstore", "logbus",
               "mcpservers", "paths", "prompting", "server", "serverstate"}


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module 'lmscli' has no attribute {name!r}")
    if name == "mcp":  # lms.mcp("NAME"): an MCP server's tools for act()
        from lmscli.mcpservers import mcp

        return mcp
    import lmscli.client as client

    try:
        return getattr(client, name)
    except AttributeError:
        raise AttributeError(f"module 'lmscli' has no attribute {name!r}") from None
