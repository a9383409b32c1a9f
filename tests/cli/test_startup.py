"""``lms`` starts fast: ``--help`` and ``ps`` import only what they use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer

from lmscli.cli.app import LAZY_COMMANDS, LazyGroup, app

# Imported by `lms --help` would mean a slow start: the engine, the server, the HTTP client,
# the REPL, and what Typer's own help renderer or its pydantic coercion pull in.
HEAVY = ("llama_cpp", "starlette", "uvicorn", "jinja2", "httpx", "httpcore", "prompt_toolkit",
         "pydantic", "markdown_it", "pygments", "huggingface_hub", "numpy")


def modules_after(*args: str, env: dict[str, str] | None = None) -> set[str]:
    code = ("import sys, json\nfrom lmscli.cli.app import run\n"
            f"code = run({list(args)!r})\n"
            "print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)),"
            " file=sys.stderr)")  # None: a module marked missing, such as httpx's CLI
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env or os.environ.copy(), timeout=60)
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


def test_help_imports_only_the_root_of_the_cli() -> None:
    loaded = modules_after("--help")
    assert {m for m in loaded if m.startswith("lmscli")} == {
        "lmscli", "lmscli.cli", "lmscli.cli.app", "lmscli.cli.root_help", "lmscli.errors"}
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)


def test_ps_without_a_server_imports_no_http_client(home: object) -> None:
    loaded = modules_after("ps")
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)
    assert not any(m.startswith(("lmscli.client", "lmscli.catalog.")) for m in loaded)


def test_the_listed_help_is_each_commands_own() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, LazyGroup)
    for name, (_, panel, summary) in LAZY_COMMANDS.items():
        command = group.load(name)
        own = command.short_help or (command.help or "").strip().split("\n")[0]
        assert (own, command.rich_help_panel) == (summary, panel), name


def test_help_lists_every_command_in_panels(capsys: pytest.CaptureFixture[str]) -> None:
    from lmscli.cli.app import run

    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    panels = [out.index(f"─ {title} ─") for title in ("Options", "Local models", "Serve")]
    assert panels == sorted(panels)
    for name in [*LAZY_COMMANDS, "status", "version"]:
        assert f"│ {name} " in out, name
    assert "--install-completion" in out and "-h, --help" in out
