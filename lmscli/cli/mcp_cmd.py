"""``lms mcp ls | add | rm``: the MCP servers of mcp.json (LM Studio's format), whose tools
``lms act --mcp NAME`` gives the agent."""

from __future__ import annotations

from typing import Any, Optional

import typer

from lmscli import paths
from lmscli.cli import console, render
from lmscli.errors import UserInputError

app = typer.Typer(help="MCP servers whose tools agents may use (mcp.json)",
                  no_args_is_help=True)


def ls(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """List the MCP servers of mcp.json, starting each to list its tools"""
    from lmscli.mcpservers import config
    from lmscli.mcpservers.servers import McpError, McpServer

    specs = config.load()
    if not specs and not json_:
        console.info(f"No MCP servers in {paths.mcp_file()}.\n\nTo add one, run:\n\n"
                     "    lms mcp add <name> -- <command> [args…]\n"
                     "    lms mcp add <name> --url https://host/mcp")
        return
    found: list[dict[str, Any]] = []
    for spec in specs:
        entry: dict[str, Any] = {"name": spec.name, "type": spec.kind, "target": spec.target(),
                                 "started": False, "error": None, "tools": []}
        try:
            with McpServer(spec) as server:
                entry["started"] = True
                entry["tools"] = [{"name": t.name, "description": t.description or "",
                                   "writes": fn.lms_writes}  # type: ignore[attr-defined]
                                  for t, fn in zip(server.tools, server.callables(),
                                                   strict=True)]
        except McpError as exc:
            entry["error"] = exc.message
        found.append(entry)
    if json_:
        render.print_json(found)
    else:
        render.mcp_table(found)


def add(
    name: str = typer.Argument(..., help="A short name for the server, such as files."),
    command: Optional[list[str]] = typer.Argument(  # noqa: UP045 - Typer needs Optional
        None, metavar="-- COMMAND [ARGS]…", help="The program that runs a stdio server."),
    url: Optional[str] = typer.Option(  # noqa: UP045
        None, "--url", help="A Streamable HTTP server's address instead of a command."),
    env: list[str] = typer.Option([], "--env", metavar="NAME=VALUE",
                                  help="An environment variable for the command (repeatable)."),
    header: list[str] = typer.Option([], "--header", metavar="NAME: VALUE",
                                     help="An HTTP header for --url (repeatable)."),
) -> None:
    """Add an MCP server to mcp.json (or replace the one with that name)"""
    from lmscli.mcpservers import config

    if bool(command) == bool(url):
        raise UserInputError("Give a command after -- (a stdio server) or --url, not both.",
                             hint="lms mcp add files -- npx -y @modelcontextprotocol/"
                                  "server-filesystem .")
    spec = config.ServerSpec(config.check_name(name), command[0] if command else None,
                             command[1:] if command else [], pairs(env, "=", "--env"),
                             url, pairs(header, ":", "--header"))
    config.spec_of(name, {"command": spec.command, "args": spec.args} if spec.command
                   else {"url": url})  # the same checks as when it is read
    config.add(spec)
    console.info(f"Added the MCP server {name} ({spec.target()}) to {paths.mcp_file()}. "
                 f"Its tools: lms mcp ls · to use them: lms act --mcp {name} \"…\"")


def pairs(items: list[str], sep: str, flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key.strip():
            raise UserInputError(f"{flag} takes NAME{sep}VALUE, not {item!r}.")
        out[key.strip()] = value.strip() if sep == ":" else value
    return out


def rm(name: str = typer.Argument(..., help="The server to remove.")) -> None:
    """Remove an MCP server from mcp.json"""
    from lmscli.mcpservers import config

    config.remove(name)
    console.info(f"Removed the MCP server {name} from {paths.mcp_file()}.")


app.command(name="ls")(ls)
app.command(name="add")(add)
app.command(name="rm")(rm)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="mcp", rich_help_panel="Local models")
