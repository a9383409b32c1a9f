"""``lms launch claude|codex|opencode``: a coding agent on this server's model, in one
command."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from lmscli import catalog, paths
from lmscli.cli import act, connect, console, prefs, render, steps
from lmscli.cli.agents import AGENT_CONTEXT, AGENTS, AgentTarget, launch, shell_lines
from lmscli.errors import UserInputError

PANEL = "Local models"


def launch_agent(
    ctx: typer.Context,
    agent: str = typer.Argument(..., help=f"The agent to run: {', '.join(AGENTS)}.",
                                autocompletion=lambda: list(AGENTS)),
    model: Optional[str] = typer.Option(None, "--model", help="The model (key or identifier). "  # noqa: UP045
                                        "Default: a loaded or downloaded model trained for "
                                        f"tools, else {catalog.TOOL_MODEL}.",
                                        autocompletion=steps.complete_model_keys),
    context_length: int = typer.Option(AGENT_CONTEXT, "-c", "--context-length", min=2048,
                                       help="The context to load the model with, if this "
                                       "command loads it."),
    print_: bool = typer.Option(False, "--print", help="Print the environment and command "
                                "instead of running the agent."),
    save: bool = typer.Option(False, "--save", help="Also write this server and model into "
                              "the agent's own config file."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Never ask: take the best match."),
) -> None:
    """Run a coding agent (Claude Code, Codex, OpenCode) on a local model"""
    if agent not in AGENTS:
        raise UserInputError(f"Unknown agent {agent!r}. Choose one of: {', '.join(AGENTS)}.")
    about = AGENTS[agent]
    path = shutil.which(about.command)
    if path is None and not print_ and not save:
        raise UserInputError(f"{about.title} is not installed (no {about.command!r} on PATH).",
                             hint=f"Install it with: {about.install}")
    target = agent_target(model, context_length, yes)
    try:
        run = launch(agent, target, Path.home(), dict(os.environ), save=save)
    except ValueError as exc:
        raise UserInputError(f"Could not read {about.title}'s config: {exc}",
                             hint="Fix or move that file, or leave out --save.") from None
    if save:
        paths.write_atomically(run.config, run.saved)
        console.info(f"Saved to {run.config}. From now on: {' '.join(run.then)}")
    if print_:
        for line in shell_lines(run, agent, ctx.args):
            print(line)
        return
    if save and not ctx.args:
        return
    if path is None:
        raise UserInputError(f"{about.title} is not installed.", hint=about.install)
    console.info(f"Starting {about.title} with {target.model} at {target.base_url}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(path, [about.command, *run.args, *ctx.args], {**os.environ, **run.env})


def agent_target(name: str | None, context_length: int, yes: bool) -> AgentTarget:
    """The server (started if needed) and a model loaded on it for an agent."""
    client = connect.client(start=True)
    assert client is not None
    with client:
        info = agent_model(client, name, context_length, yes)
        base_url = connect.base_url()
    assert base_url is not None
    context = int(info.get("contextLength") or 0)
    if context < context_length:
        console.warn(f"{info['identifier']} is loaded with a context of {context} tokens; "
                     f"coding agents need about {context_length}. To reload it: lms unload "
                     f"{info['identifier']} && lms load {info['modelKey']} -c {context_length}")
    return AgentTarget(base_url, info["identifier"], context, connect.target().api_key)


def agent_model(client: Any, name: str | None, context_length: int, yes: bool
                ) -> dict[str, Any]:
    """The loaded instance's info: the named model, else a tool model (fetched if none is
    downloaded), loaded with ``context_length`` (or less, where the model has less)."""
    loaded = client.loaded_models_info()
    if name is not None:
        same = [m for m in loaded if name in (m["identifier"], m["modelKey"])]
        if same:
            return same[0]
        return load(client, steps.resolve_key(name, exact=False, yes=yes), context_length)
    downloaded = client.downloaded_models_info()
    choice = act.choose_agent_model(loaded, downloaded, prefs.last_loaded())
    if choice is None:
        console.info(f"No downloaded model is trained for tools: fetching {catalog.TOOL_MODEL}.")
        steps.fetch(catalog.TOOL_MODEL)
        return load(client, catalog.TOOL_MODEL, context_length)
    console.info(f"Using {choice.key}: {choice.reason}.")
    if choice.loaded:
        return next(m for m in loaded if m["identifier"] == choice.key)
    return load(client, choice.key, context_length, downloaded)


def load(client: Any, key: str, context_length: int,
         downloaded: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Load ``key`` with ``context_length``, or the model's most where it has less."""
    if downloaded is None:
        downloaded = client.downloaded_models_info()
    most = next((m.get("maxContextLength") for m in downloaded if m["modelKey"] == key), None)
    prefs.remember_loaded(key)
    line = render.PercentLine(f"Loading {key}")
    try:
        return client.load(key, context_length=min(context_length, most or context_length),
                           on_progress=line.update)
    finally:
        line.finish()


def register(app: typer.Typer) -> None:
    app.command(name="launch", rich_help_panel=PANEL, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True})(
        connect.with_connection(launch_agent))
