"""``lms chat``: one-shot answers for scripts, a REPL for people."""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from lmscli import catalog
from lmscli.cli import act_view, connect, console, render, steps
from lmscli.cli.tooling import TOOL_ROUNDS, Approval, McpTools
from lmscli.errors import LMSError

DEFAULT_SYSTEM_PROMPT = ("You are an AI assistant running in the user's terminal. Provide "
                         "helpful and concise responses.")


def chat(
    model: Optional[str] = typer.Argument(None, help="The model to chat with (key or "  # noqa: UP045
                                          "identifier). Default: the loaded one, else "
                                          f"{catalog.DEFAULT_MODEL}.",
                                          autocompletion=steps.complete_model_keys),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt",  # noqa: UP045
                                         help="Print response to stdout and quit."),
    system_prompt: str = typer.Option(DEFAULT_SYSTEM_PROMPT, "-s", "--system-prompt",
                                      help="The system prompt."),
    stats: bool = typer.Option(False, "--stats", help="Print stats after each response."),
    ttl: int = typer.Option(3600, "--ttl", min=1, help="Unload the model after this many "
                            "idle seconds, if this command loaded it."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Assume yes: take the best match."),
    mcp: list[str] = typer.Option([], "--mcp", metavar="NAME", help="Give the model the tools "
                                  "of an MCP server in mcp.json (repeatable; all: every one). "
                                  "A tool that may change something asks first."),
) -> None:
    """Start an interactive chat with a model"""
    piped = not sys.stdin.isatty()
    text = None
    if prompt is not None or piped:
        text = one_shot_prompt(prompt, sys.stdin.read() if piped else None)
        if not text:
            console.error("No prompt provided for non-interactive chat.")
            return  # lms exits 0 here
    with McpTools(mcp) as servers:
        tool_view = act_view.ActView(False)
        approval = Approval(False, False)
        approval.view = tool_view
        tools: list[Any] = []
        for server in servers:
            tools += [tool_view.timed(approval.guard(fn))
                      for fn in server.callables(fn.__name__ for fn in tools)]
        handle = steps.open_model(model, ttl, yes)
        if text is not None:
            one_shot(handle, system_prompt, text, stats, tools, tool_view)
            return
        from lmscli.cli.repl import ChatSession

        code = ChatSession(handle, system_prompt=system_prompt, show_stats=stats, ttl=ttl,
                           tools=tools, tool_view=tool_view).run()
    raise typer.Exit(code)


def one_shot_prompt(prompt: str | None, stdin: str | None) -> str:
    """lms's rules: -p and piped stdin join with a blank line."""
    piped = (stdin or "").strip()
    if prompt is not None and piped:
        return f"{prompt}\n\n{piped}"
    return (prompt if prompt is not None else piped).strip()


def one_shot(handle: Any, system_prompt: str, text: str, show_stats: bool,
             tools: list[Any] | None = None, tool_view: Any = None) -> None:
    """Stream the answer to stdout (stats to stderr); a trailing newline always ends it.
    With tools, the calls and their results show on stderr between the rounds."""
    from lmscli.client import Chat

    chat = Chat(system_prompt)
    chat.add_user_message(text)
    written: list[str] = [""]

    def write(content: str) -> None:
        sys.stdout.write(content)
        sys.stdout.flush()
        written.append(content or written[-1])

    try:
        if tools:
            rounds: list[Any] = []
            handle.act(chat, tools, max_prediction_rounds=TOOL_ROUNDS,
                       on_message=tool_view.message,
                       on_prediction_fragment=lambda fragment, _i: write(fragment.content),
                       on_prediction_completed=rounds.append)
            result = rounds[-1]
        else:
            with handle.respond_stream(chat) as stream:
                for fragment in stream:
                    write(fragment.content)
                result = stream.result()
    except LMSError as exc:
        raise LMSError(f"Error during chat: {exc.message}", hint=exc.hint) from exc
    if show_stats:
        for line in render.stats_lines(result.stats):
            console.info(line)
    if not written[-1].endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command(name="chat", rich_help_panel="Local models")(connect.with_connection(chat))
