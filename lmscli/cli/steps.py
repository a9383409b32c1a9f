"""Steps several commands share: resolve a model key, fetch a model, open one to chat with.

Commands import from here, never from each other.
"""

from __future__ import annotations

from typing import Any

from lmscli import catalog
from lmscli.cli import connect, console, prefs, render
from lmscli.errors import ModelNotFoundError, UserInputError


def complete_model_keys(incomplete: str) -> list[str]:
    """Shell completion from the models folder; never contacts the server."""
    keys = [m.model_key for m in catalog.list_models()]
    return [k for k in keys if k.startswith(incomplete)] or \
        [k for k, _ in catalog.fuzzy_filter(incomplete, keys)]


def resolve_key(key: str | None, exact: bool, yes: bool) -> str:
    """lms's resolution: --exact on paths, else fuzzy over keys, recent first. A remote
    server's models are not on this disk: its key is taken as given."""
    if connect.target().remote:
        if not key:
            raise UserInputError("Name the model to use on the remote server.",
                                 hint="To see its models, run: lms ls --host HOST")
        return key
    models = [m for m in catalog.list_models() if "clip" not in (m.architecture or "").lower()]
    if not models:
        raise ModelNotFoundError("You have not downloaded any models yet.",
                                 hint=f"Download one with: lms get {catalog.DEFAULT_MODEL}")
    recent = prefs.last_loaded()
    models.sort(key=lambda m: recent.index(m.model_key) if m.model_key in recent else 99)
    keys = [m.model_key for m in models]
    if exact:
        return _exact(key, models)
    matches = [k for k, _ in catalog.fuzzy_filter(key or "", keys)]
    if key and key.lower() in (k.lower() for k in keys):
        return next(k for k in keys if k.lower() == key.lower())
    if key and len(matches) == 1:
        return matches[0]
    return _choose(key, matches, keys, models, yes)


def _exact(key: str | None, models: list[Any]) -> str:
    if not key:
        raise UserInputError("Path not provided: --exact needs the model's path.")
    for m in models:
        if key in (m.path, str(m.abs_path)):
            return m.model_key
    shortest = min((m.path for m in models), key=len)
    raise ModelNotFoundError(f"No model has the path {key!r}.",
                             hint=f"For example: lms load --exact {shortest}")


def _choose(key: str | None, matches: list[str], keys: list[str], models: list[Any],
            yes: bool) -> str:
    if yes:
        if not matches:
            raise ModelNotFoundError(f"No model matches {key!r}.", available=keys,
                                     hint="Downloaded: " + ", ".join(keys))
        if len(matches) > 1:
            console.warn(f"{len(matches)} models match the provided model key. "
                         "Loading the first one.")
        return matches[0]
    if not console.stdin_is_tty() or not console.stderr_is_tty():
        what = f"matching {key!r}" if key else "given"
        if not matches:
            raise ModelNotFoundError(f"No model {what}.", available=keys,
                                     hint="Downloaded: " + ", ".join(keys))
        raise UserInputError(f"{len(matches)} models match {key!r}: " + ", ".join(matches)
                             if key else "No model key given. Downloaded: " + ", ".join(keys),
                             hint="Name one exactly, or pass -y to load the best match.")
    from lmscli.cli import picker

    console.info("")
    if key and not matches:
        console.err.print(f"[error]![/error] Cannot find a model matching the provided model key "
                          f"({key}). Please select one from the list below.")
    elif key:
        console.err.print("[warn]![/warn] Multiple models match the provided model key. "
                          "Please select one.")
    sizes = {m.model_key: render.size_1024(m.size_bytes) for m in models}
    return picker.pick("Select a model to load", keys, sizes, initial=key if matches else "")


class DownloadBar:
    """A rich progress bar on stderr; nothing when stderr is not a terminal."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None

    def update(self, done: int, total: int) -> None:
        if not console.stderr_is_tty():
            return
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress("[progress.description]Downloading", BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(),
                                      TimeRemainingColumn(), console=console.err,
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task("download", total=total)
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def fetch(name: str) -> Any:
    """Download a model (a rich bar on a terminal); returns the catalog's GetResult. Says what
    happens, and no more: a caller that loads the model next says so itself."""
    bar = DownloadBar()
    try:
        result = catalog.get_model(name, on_status=console.info, on_progress=bar.update)
    finally:
        bar.close()
    if not result.already_present:
        console.info("Download completed.")
    return result


def open_model(name: str | None, ttl: int, yes: bool) -> Any:
    """The model to chat with, loading (and fetching the default model) as needed."""
    client = connect.client(start=True)
    assert client is not None
    if name is not None:
        key = name if served_as_named(client, name) else resolve_key(name, exact=False, yes=yes)
        return load_with_progress(client, key, ttl)
    loaded_models = client.list_loaded_models("llm")
    if loaded_models:
        return loaded_models[0]
    if not connect.target().remote and catalog.find_model(catalog.DEFAULT_MODEL) is None:
        console.info(f"No model is downloaded yet: fetching {catalog.DEFAULT_MODEL}.")
        fetch(catalog.DEFAULT_MODEL)
    return load_with_progress(client, catalog.DEFAULT_MODEL, ttl)


def linked_model(client: Any, name: str) -> dict[str, Any] | None:
    """The linked model (its instance info) that ``name`` reaches, if any."""
    return next((m for m in client.loaded_models_info()
                 if m.get("format") == "linked" and name in m.get("aliases", ())), None)


def served_as_named(client: Any, name: str) -> bool:
    """Whether the server knows ``name`` as it is: a loaded identifier, a linked model, or
    ``LINK/model`` on a link (its engine's models are not on this disk to match against)."""
    loaded = client.loaded_models_info()
    if any(name == m["identifier"] or name in m.get("aliases", ()) for m in loaded):
        return True
    prefix, slash, _ = name.partition("/")
    if not slash:
        return False
    from lmscli.client.links import list_links

    return prefix in {link["name"] for link in list_links(client)}


def load_with_progress(client: Any, key: str, ttl: int) -> Any:
    line = render.PercentLine(f"Loading {key}")
    try:
        return client.llm.model(key, ttl=ttl, on_load_progress=line.update)
    finally:
        line.finish()
