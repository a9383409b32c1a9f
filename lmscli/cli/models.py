"""``lms get | import | ls | ps | load | unload | status``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmscli import catalog, linkstore
from lmscli.cli import connect, console, prefs, render, steps
from lmscli.errors import CancelledError, ModelNotFoundError, UserInputError

PANEL = "Local models"


# -- get / import ---------------------------------------------------------------------------

def get(name: str = typer.Argument(..., help="A built-in name (e.g. smollm2-135m-instruct), "
                                   r"owner/repo\[@quant] or a https://huggingface.co URL."),
        yes: bool = typer.Option(False, "-y", "--yes", help="Answer yes to any question "
                                 "(for scripts).")) -> None:
    """Download a model"""
    # lms's -y picks the first search result; here every choice is already automatic (the
    # built-in name, the repository's Q4_K_M file), so scripts written for lms just work
    result = steps.fetch(name)
    # after a download steps.fetch said "Download completed."; only the next step is left
    console.info("Model already downloaded. To use, run:" if result.already_present
                 else "To use, run:")
    console.info(f"    lms load {result.model.model_key}")


def import_(
    file_path: Path = typer.Argument(..., help="The GGUF file to import."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Answer yes to every question."),
    user_repo: Optional[str] = typer.Option(None, "--user-repo", metavar="USER/REPO",  # noqa: UP045
                                            help="Where in the models folder to put it."),
    copy: bool = typer.Option(False, "-c", "--copy", help="Copy the file instead of moving it."),
    hard_link: bool = typer.Option(False, "-L", "--hard-link", help="Create a hard link."),
    symbolic_link: bool = typer.Option(False, "-l", "--symbolic-link",
                                       help="Create a symbolic link."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would happen."),
) -> None:
    """Import a model file into lmscli"""
    chosen = [m for m, on in (("copy", copy), ("hardlink", hard_link),
                              ("symlink", symbolic_link)) if on]
    if len(chosen) > 1:
        raise UserInputError("Only one of --copy, --hard-link and --symbolic-link can be given.")
    mode = chosen[0] if chosen else "move"
    if mode == "move" and not yes and not dry_run and console.stdin_is_tty() \
            and not typer.confirm(f"This moves {file_path} into the models folder. Continue?",
                                  err=True):
        raise CancelledError("Import cancelled.")
    result = catalog.import_model(file_path, mode=mode, user_repo=user_repo, dry_run=dry_run)
    verb = {"move": "File moved to", "copy": "File copied to", "hardlink": "Hard link created at",
            "symlink": "Symbolic link created at"}[mode]
    if dry_run:
        console.info(f"Would {mode} the file to {result.target}")
        console.info("But not actually doing it because of --dry-run")
    else:
        console.info(f"{verb} {result.target}")


# -- ls / ps --------------------------------------------------------------------------------

def loaded_models(start: bool = False) -> list[dict[str, Any]] | None:
    """What the server has loaded; None when no server runs (and ``start`` is false)."""
    client = connect.client(start=start)
    if client is None:
        return None
    with client:
        return client.loaded_models_info()


def ls(
    llm: bool = typer.Option(False, "--llm", help="Show only LLMs."),
    embedding: bool = typer.Option(False, "--embedding", help="Show only embedding models."),
    json_: bool = typer.Option(False, "--json", help="Output as JSON."),
) -> None:
    """List the models available on disk, and those of linked engines"""
    models = models_on_disk()
    loaded = loaded_models() or []
    linked = [m for m in loaded if m.get("format") == "linked"]
    wanted = {t for t, on in (("llm", llm), ("embedding", embedding)) if on}
    shown = [m for m in models if not wanted or m["type"] in wanted]
    shown_linked = [m for m in linked if not wanted or m["type"] in wanted]
    if json_:
        render.print_json(shown + shown_linked)
        return
    if not models and not linked:
        console.out.print("You have not downloaded any models yet.", style="error")
        console.info(f"Download the default model with: lms get {catalog.DEFAULT_MODEL}")
        return
    if not shown and not shown_linked:
        console.out.print(f"You have {len(models)} models, but none of them match the filter.",
                          markup=False)
        return
    counts: dict[str, int] = {}
    for entry in loaded:
        if entry.get("format") != "linked":
            counts[entry["modelKey"]] = counts.get(entry["modelKey"], 0) + 1
    render.models_table(shown, counts, shown_linked)


def models_on_disk() -> list[dict[str, Any]]:
    """ModelInfo of the downloaded models: this disk's, or the remote server's."""
    if not connect.target().remote:
        return [m.model_info() for m in catalog.list_models()]
    with connect.client() as client:  # type: ignore[union-attr]
        return client.downloaded_models_info()


def ps(json_: bool = typer.Option(False, "--json", help="Output as JSON.")) -> None:
    """List the models currently loaded in memory"""
    loaded = loaded_models()
    if json_:
        render.print_json(loaded or [])
        return
    if loaded is None:
        console.info("The server is not running, so no models are loaded.")
        console.info("\nTo start it and load a model, run:\n\n    lms load <model key>")
        return
    if not loaded:
        console.info("No models are currently loaded.\n\nTo load a model, run:\n\n"
                     "    lms load <model key>")
        return
    render.loaded_table(loaded)


# -- load / unload --------------------------------------------------------------------------

def parse_gpu(value: str | None) -> float | str | None:
    if value is None or value in ("off", "max"):
        return value
    try:
        ratio = float(value)
    except ValueError:
        raise UserInputError(f"option '--gpu' argument {value!r} is invalid. Not a number") \
            from None
    if not 0 <= ratio <= 1:
        raise UserInputError("option '--gpu' must be \"off\", \"max\" or between 0 and 1.")
    return ratio


def load(
    model_key: Optional[str] = typer.Argument(None, help="The model to load (fuzzy matched).",  # noqa: UP045
                                              autocompletion=steps.complete_model_keys),
    identifier: Optional[str] = typer.Option(None, "--identifier",  # noqa: UP045
                                             help="The identifier to assign to the loaded model."),
    context_length: Optional[int] = typer.Option(None, "-c", "--context-length", min=1,  # noqa: UP045
                                                 help="The number of tokens to consider as "
                                                 "context."),
    gpu: Optional[str] = typer.Option(None, "--gpu", metavar="off|max|0..1",  # noqa: UP045
                                      help='GPU offload ratio: "off", "max" or a number between '
                                      "0 and 1."),
    ttl: Optional[int] = typer.Option(None, "--ttl", min=1,  # noqa: UP045
                                      help="Unload after this many idle seconds."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, max=64,  # noqa: UP045
                                           help="Maximum number of predictions the model can "
                                           "run at a given time (default 4)."),
    speculative: Optional[str] = typer.Option(None, "--speculative", metavar="off|ngram",  # noqa: UP045
                                              help="Speculative decoding: \"ngram\" drafts "
                                              "tokens from the context and other requests and "
                                              "verifies them in one step (default ngram)."),
    draft_model: Optional[str] = typer.Option(None, "--speculative-draft-model",  # noqa: UP045
                                              metavar="<model>",
                                              help="A smaller model (same vocabulary) that "
                                              "drafts tokens for this one to verify."),
    draft_max: Optional[int] = typer.Option(None, "--speculative-draft-max-tokens",  # noqa: UP045
                                            metavar="<n>",
                                            help="The most tokens drafted at once."),
    draft_min: Optional[int] = typer.Option(None, "--speculative-draft-min-tokens",  # noqa: UP045
                                            metavar="<n>",
                                            help="A shorter draft is not verified."),
    exact: bool = typer.Option(False, "--exact", help="Match the model's path exactly."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Never ask: take the best match."),
) -> None:
    """Load a model"""
    if speculative not in (None, "off", "ngram"):
        raise UserInputError(f"option '--speculative' argument {speculative!r} is invalid. "
                             'Use "off" or "ngram".')
    check_draft_flags(draft_model, draft_max, draft_min)
    ratio = parse_gpu(gpu)
    clash = linkstore.identifier_clash(identifier) if identifier is not None else None
    if clash is not None:  # before a server is started for nothing
        raise UserInputError(clash)
    linked = linked_model(model_key) if model_key and not exact else None
    if linked is not None:  # before fuzzy matching, which would pick a local model
        console.info(f"{model_key} is served by the link {linked['device']}: there is nothing "
                     f'to load. To use it in the API/SDK, use the identifier "{model_key}".')
        return
    key = steps.resolve_key(model_key, exact, yes)
    with connect.client() as client:  # type: ignore[union-attr]
        existing = [m for m in client.loaded_models_info() if m["modelKey"] == key]
        same = [m for m in existing if identifier in (None, m["identifier"])]
        if same:
            console.info(f'Model {key} is already loaded as "{same[0]["identifier"]}".')
            return
        prefs.remember_loaded(key)
        line = render.PercentLine(f"Loading {key}")
        try:
            info = client.load(key, identifier=identifier, context_length=context_length,
                               gpu=ratio, ttl=ttl, parallel=parallel, speculative=speculative,
                               draft_model=draft_model, draft_max_tokens=draft_max,
                               draft_min_tokens=draft_min, on_progress=line.update)
        except KeyboardInterrupt:
            line.finish()
            console.warn("Load cancelled.")
            raise typer.Exit(1) from None
        finally:
            line.finish()
    console.info(f"Model loaded successfully in {render.elapsed(info['loadTimeSec'] or 0)}.")
    console.info(f"({render.size_1024(info['sizeBytes'])})")
    console.info(f'To use the model in the API/SDK, use the identifier "{info["identifier"]}".')


def check_draft_flags(model: str | None, most: int | None, least: int | None) -> None:
    """The draft flags, checked before a server is started for nothing (lms's messages)."""
    if model is not None and not model.strip():
        raise UserInputError("option '--speculative-draft-model' must name a model.")
    if most is not None and most < 1:
        raise UserInputError(f"option '--speculative-draft-max-tokens' argument {most} is "
                             "invalid. Use a number of at least 1.")
    if least is not None and least < 0:
        raise UserInputError(f"option '--speculative-draft-min-tokens' argument {least} is "
                             "invalid. Use a number of at least 0.")
    if most is not None and least is not None and least > most:
        raise UserInputError(f"option '--speculative-draft-min-tokens' ({least}) must not be "
                             f"more than '--speculative-draft-max-tokens' ({most}).")


def linked_model(name: str) -> dict[str, Any] | None:
    """The linked model ``name`` reaches on the running server (none is started for this)."""
    client = connect.client(start=False)
    if client is None:
        return None
    with client:
        return steps.linked_model(client, name)


def unload(
    identifier: Optional[str] = typer.Argument(None, help="The identifier of the model."),  # noqa: UP045
    all_: bool = typer.Option(False, "-a", "--all", help="Unload all models."),
) -> None:
    """Unload a model"""
    if all_ and identifier:
        console.err.print("[error]Invalid Usage[/error]\n\nYou cannot provide an identifier "
                          "together with --all.")
        return
    client = connect.client(start=False)
    everything = client.loaded_models_info() if client else []
    loaded = [m for m in everything if m.get("format") != "linked"]
    if identifier and any(identifier in m.get("aliases", ()) for m in everything
                          if m not in loaded):
        assert client is not None
        client.unload(identifier)  # the server refuses, saying which link serves it
    if all_:
        _unload_all(client, loaded)
        return
    if not loaded:
        raise ModelNotFoundError('You don\'t have any models loaded. Use "lms load" to load a '
                                 "model.")
    assert client is not None
    if identifier is None:
        if len(loaded) > 1:
            ids = ", ".join(m["identifier"] for m in loaded)
            raise UserInputError(f"{len(loaded)} models are loaded: {ids}",
                                 hint="Name one (lms unload <identifier>), or use --all.")
        identifier = loaded[0]["identifier"]
    elif identifier not in {m["identifier"] for m in loaded}:
        console.err.print(f"[error]Model Not Found[/error]\n\nNo model with the identifier "
                          f'"{identifier}" is loaded. To see loaded models, run: lms ps')
        return  # lms exits 0 here
    client.unload(identifier)
    console.info(f'Model "{identifier}" unloaded.')


def _unload_all(client: Any, loaded: list[dict[str, Any]]) -> None:
    if not loaded:
        console.info("No models to unload.")
        return
    for m in loaded:
        console.info(f'Unloading "{m["identifier"]}"...')
    client.unload_all()
    console.info(f"Unloaded {len(loaded)} model{'s' if len(loaded) != 1 else ''}.")


def status() -> None:
    """Prints the status of the server and the loaded models."""
    print_status()


def print_status() -> None:
    """lms status: the server line, then the loaded models (stdout)."""
    where = connect.server_port()
    if where is None:
        console.out.print("Server:  OFF \n\n(i) To start the server, run the following command:"
                          "\n\n    lms server start", markup=False)
        return
    console.out.print(f"Server: ON (port: {where})\n", markup=False)
    loaded = loaded_models() or []
    if not loaded:
        console.out.print("No Models Loaded", markup=False)
        return
    console.out.print("Loaded Models", markup=False)
    for m in loaded:
        where = f"via {m['device']}" if m.get("format") == "linked" \
            else render.size_1000(m["sizeBytes"])
        console.out.print(f"  · {m['identifier']} - [dim]{where}[/dim]")


def register(app: typer.Typer) -> None:
    for fn, name in ((get, "get"), (import_, "import")):
        app.command(name=name, rich_help_panel=PANEL)(fn)
    for fn, name in ((load, "load"), (unload, "unload"), (ls, "ls"), (ps, "ps")):
        app.command(name=name, rich_help_panel=PANEL)(connect.with_connection(fn))
    app.command(name="status", rich_help_panel="Serve")(connect.with_connection(status))
