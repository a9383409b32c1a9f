"""``lms link add | ls | rm``: OpenAI-compatible engines (vLLM, SGLang, llama-server, Ollama,
another lmscli) whose models the server lists and serves by key, as if they were local."""

from __future__ import annotations

from typing import Any, Optional

import typer

from lmscli import linkstore
from lmscli.cli import connect, console, render
from lmscli.errors import UserInputError

app = typer.Typer(help="Serve models of other engines (vLLM, llama-server, another lmscli) "
                  "through this server", no_args_is_help=True)
MAX_SHOWN_MODELS = 3


def _checked(check: Any, value: str) -> str:
    """The CLI checks what it can before a server is started for nothing."""
    try:
        return check(value)
    except linkstore.LinkConfigError as exc:
        raise UserInputError(str(exc)) from None


def add(
    name: str = typer.Argument(..., help="A short name for the engine, such as gpu1. Its "
                               "models are also reachable as NAME/model."),
    url: str = typer.Argument(..., help="The engine's OpenAI-compatible address, such as "
                              "http://gpu-box:8000 or http://gpu-box:8000/v1."),
    key: Optional[str] = typer.Option(  # noqa: UP045 - Typer needs Optional on 3.10
        None, "--api-key", show_default=False,
        help="The engine's API key. The server stores it readable by you only and never "
        "shows it."),
) -> None:
    """Link an engine: its models become usable through this server"""
    name = _checked(linkstore.check_name, name)
    _checked(linkstore.normalise_url, url)
    from lmscli.client.links import add_link

    with connect.client() as client:  # type: ignore[union-attr]
        link = add_link(client, name, url, key)
    if link["reachable"]:
        console.info(f"Linked {link['name']} at {link['url']}: {models_text(link['models'])}.")
    else:
        console.warn(f"Linked {link['name']} at {link['url']}, but it does not answer now: "
                     f"{link['error']}. Its models appear once it does.")


def ls(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """List the linked engines, asking each for its models now"""
    from lmscli.client.links import list_links

    with connect.client() as client:  # type: ignore[union-attr]
        links = list_links(client, refresh=True)
    if json_:
        render.print_json(links)
        return
    if not links:
        console.info("No engines are linked.\n\nTo link one, run:\n\n"
                     "    lms link add <name> http://<host>:<port>")
        return
    render.links_table(links)


def rm(name: str = typer.Argument(..., help="The link to remove.")) -> None:
    """Remove a link (the engine itself keeps running)"""
    from lmscli.client.links import remove_link

    with connect.client() as client:  # type: ignore[union-attr]
        remove_link(client, name)
    console.info(f"Removed the link {name}.")


def models_text(models: list[str]) -> str:
    if not models:
        return "no models"
    shown = ", ".join(models[:MAX_SHOWN_MODELS])
    more = len(models) - MAX_SHOWN_MODELS
    noun = "model" if len(models) == 1 else "models"
    return f"{len(models)} {noun} ({shown}{f', +{more} more' if more > 0 else ''})"


app.command(name="add")(connect.with_connection(add, key_flag="--server-api-key"))
app.command(name="ls")(connect.with_connection(ls))
app.command(name="rm")(connect.with_connection(rm))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="link", rich_help_panel="Serve")
