"""``lms --help``: the root help, drawn like Typer's panels with a few rich parts.

Typer's own help renderer imports rich's markdown, syntax and traceback support (markdown-it
and pygments), which is about half of what ``lms --help`` took to start. The root help needs
none of it: a usage line, the options and the commands grouped in panels.
"""

from __future__ import annotations

from typing import Any

COMMANDS_PANEL = "Commands"


def print_root_help(group: Any, ctx: Any) -> None:
    from rich.console import Console
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    usage = " ".join(group.collect_usage_pieces(ctx))
    console.print(Padding(Text.assemble(("Usage: ", "yellow"), (ctx.command_path, "bold"),
                                        f" {usage}"), 1))
    if group.help:
        console.print(Padding(group.help, (0, 1, 1, 1)))
    for title, rows in _panels(group, ctx):
        table = Table(box=None, show_header=False, padding=(0, 1), pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name, text in rows:
            table.add_row(name, text)
        console.print(Panel(table, title=title, title_align="left", border_style="dim"))
    if group.epilog:
        console.print(Padding(group.epilog, 1))


def _panels(group: Any, ctx: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """("Options", its rows), then each help panel of commands in order of first use, with
    the commands of no panel last."""
    # short names first (Click keeps help's names in a set: their order varies)
    options = [(" ".join([", ".join(sorted(p.opts, key=len)), *p.secondary_opts]), p.help or "")
               for p in group.get_params(ctx) if getattr(p, "opts", None) and not p.hidden]
    panels: dict[str, list[tuple[str, str]]] = {"Options": options}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        panel = getattr(command, "rich_help_panel", None) or COMMANDS_PANEL
        summary = command.short_help or (command.help or "").strip().split("\n")[0]
        panels.setdefault(panel, []).append((name, summary))
    rest = panels.pop(COMMANDS_PANEL, None)
    return list(panels.items()) + ([(COMMANDS_PANEL, rest)] if rest else [])
