"""``lms act``: a terminal agent that shows every round of tool calls."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from lmscli import catalog
from lmscli.cli import act_view, connect, console, prefs, steps
from lmscli.cli.tooling import Approval, McpTools
from lmscli.errors import ExitCode, UserInputError

ACT_SYSTEM_PROMPT = ("You are a task-focused AI agent running in the user's terminal. Use the "
                     "available tools when they help, then answer concisely.")


def act(
    args: list[str] = typer.Argument(..., metavar="[MODEL] TASK",
                                     help="The task, optionally after the model to use."),
    tools: list[Path] = typer.Option([], "--tools", help="A Python file whose public "
                                     "functions with docstrings become tools (repeatable)."),
    tool_specs: list[str] = typer.Option([], "-T", "--tool", metavar="MODULE:FUNCTION",
                                         help="One importable function as a tool "
                                         "(repeatable)."),
    no_builtin: bool = typer.Option(False, "--no-builtin-tools",
                                    help="Leave out the built-in toolbox."),
    mcp: list[str] = typer.Option([], "--mcp", metavar="NAME", help="The tools of an MCP "
                                  "server in mcp.json (repeatable; all: every one). See: "
                                  "lms mcp ls"),
    max_rounds: int = typer.Option(10, "--max-rounds", min=1, help="At most this many "
                                   "prediction rounds; the last one gets no tools."),
    tool_choice: str = typer.Option("auto", "--tool-choice", metavar="auto|required",
                                    help="required: the first round must call a tool."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Approve every tool call."),
    json_: bool = typer.Option(False, "--json", help="One JSON event per line."),
    ttl: int = typer.Option(3600, "--ttl", min=1, help="Idle TTL if this loads the model."),
    temperature: Optional[float] = typer.Option(  # noqa: UP045 - Typer needs Optional on 3.10
        None, "--temperature", min=0, max=2, help="Sampling temperature; 0 is greedy, which "
        "small models call tools more reliably with. Default: the server's."),
) -> None:
    """Run a multi-round tool-calling agent on a task"""
    if len(args) > 2:
        raise UserInputError("Give at most a model and a task (quote the task).")
    if tool_choice not in ("auto", "required"):
        raise UserInputError("--tool-choice must be auto or required.")
    model_name, task = (args[0], args[1]) if len(args) == 2 else (None, args[0])
    approval = Approval(yes, json_)
    view = act_view.ActView(json_)
    with McpTools(mcp) as servers:
        toolset = [view.timed(approval.guard(t))
                   for t in collect_tools(tools, tool_specs, not no_builtin, servers)]
        run_agent(model_name, task, toolset, approval, view, max_rounds=max_rounds, ttl=ttl,
                  yes=yes, tool_choice=tool_choice, temperature=temperature)


def run_agent(model_name: str | None, task: str, toolset: list[Callable], approval: Approval,
              view: act_view.ActView, *, max_rounds: int, ttl: int, yes: bool,
              tool_choice: str, temperature: float | None) -> None:
    handle = open_agent_model(model_name, ttl, yes)
    view.start(handle.identifier, task, [t.__name__ for t in toolset])
    approval.view = view
    from lmscli.client import Chat

    chat = Chat(ACT_SYSTEM_PROMPT)
    chat.add_user_message(task)
    try:
        config = None if temperature is None else {"temperature": temperature}
        result = handle.act(chat, toolset, max_prediction_rounds=max_rounds,
                            tool_choice=tool_choice, config=config, **view.callbacks())
    except KeyboardInterrupt:
        view.stopped()
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    view.finish(result)


@dataclass(frozen=True)
class AgentModel:
    key: str  # the identifier of a loaded model, else the key of a downloaded one
    loaded: bool
    reason: str


def choose_agent_model(loaded: list[dict[str, Any]], downloaded: list[dict[str, Any]],
                       recent: list[str]) -> AgentModel | None:
    """A model whose chat template supports tools: a loaded one, else a downloaded one (the
    most recently loaded, else the smallest); None when there is none. Both lists hold the
    server's model info."""
    for info in loaded:
        if info.get("type", "llm") == "llm" and info.get("trainedForToolUse"):
            return AgentModel(info["identifier"], True,
                              "it is loaded and its chat template supports tool calls")
    tool_models = [m for m in downloaded if m.get("type") == "llm" and m.get("trainedForToolUse")]
    if not tool_models:
        return None
    best = min(tool_models, key=lambda m: (recent.index(m["modelKey"]) if m["modelKey"] in recent
                                           else len(recent), m.get("sizeBytes") or 0))
    why = "its chat template supports tool calls"
    if loaded:
        why += " (the loaded model's does not)"
    return AgentModel(best["modelKey"], False, why)


def open_agent_model(name: str | None, ttl: int, yes: bool) -> Any:
    """The named model, else one that supports tools, else the loaded or the default one;
    says on stderr which and why when it chose."""
    if name is not None:
        return steps.open_model(name, ttl, yes)
    client = connect.client(start=True)
    assert client is not None
    # the server's lists: a remote server's models are not on this disk
    choice = choose_agent_model(client.loaded_models_info(), client.downloaded_models_info(),
                                prefs.last_loaded())
    if choice is None:
        handle = steps.open_model(None, ttl, yes)
        console.info(f"Using {handle.identifier}: no loaded or downloaded model has a chat "
                     "template that supports tool calls, so tools are described in its "
                     f"prompt. For a model trained for tools: lms get {catalog.TOOL_MODEL}")
        return handle
    console.info(f"Using {choice.key}: {choice.reason}.")
    if choice.loaded:
        return next(h for h in client.list_loaded_models("llm") if h.identifier == choice.key)
    return steps.load_with_progress(client, choice.key, ttl)


def collect_tools(files: list[Path], specs: list[str], builtin: bool,
                  servers: Sequence[Any] = ()) -> list[Callable]:
    from lmscli.client.toolbox import make_toolbox

    found: list[Callable] = make_toolbox() if builtin else []
    for path in files:
        found += tools_from_file(path)
    for spec in specs:
        found.append(tool_from_spec(spec))
    for server in servers:  # a name already taken gets the server's name in front
        found += server.callables(fn.__name__ for fn in found)
    if not found:
        raise UserInputError("No tools: give --tools, -T or --mcp, or keep the built-in "
                             "toolbox.")
    return found


def tools_from_file(path: Path) -> list[Callable]:
    if not path.is_file():
        raise UserInputError(f"Tool file not found: {path}")
    name = f"lms_tools_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken tool file is the user's to fix: say where
        raise UserInputError(f"Could not load {path}: {type(exc).__name__}: {exc}") from exc
    fns = [fn for n, fn in inspect.getmembers(module, inspect.isfunction)
           if not n.startswith("_") and fn.__module__ == name and inspect.getdoc(fn)]
    if not fns:
        raise UserInputError(f"{path} has no public function with a docstring.")
    return fns


def tool_from_spec(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserInputError(f"-T takes module:function, not {spec!r}.")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"Cannot import {spec}: {exc}") from exc
    if not callable(fn):
        raise UserInputError(f"{spec} is not a function.")
    return fn


def register(app: typer.Typer) -> None:
    app.command(name="act", rich_help_panel="Local models")(connect.with_connection(act))
