"""``lolcats plugins``: list the installed feature maps and windows, or describe one of them."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..core.model import registry
from .reporting import stderr, stdout

EPILOG = """[bold]Examples[/bold]

[cyan]lolcats plugins[/cyan]

[cyan]lolcats plugins --json[/cyan]

[cyan]lolcats plugins hedgehog[/cyan]

[cyan]LOLCATS_PLUGINS=lolcats-example-plugin lolcats plugins[/cyan]
"""


def command(
    name: Optional[str] = typer.Argument(None, help="Show one plugin's parameters (imports that plugin)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind: feature_map or window."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of a table."),
) -> None:
    """List the feature maps and windows that are installed, with the distribution providing each.

    Plugins are found through the entry-point groups [bold]lolcats.feature_maps[/bold] and
    [bold]lolcats.windows[/bold]; set [bold]LOLCATS_PLUGINS[/bold] to a comma-separated list of
    distributions to load only those (the built-ins always load). A name that several distributions
    register is listed once per distribution and marked as a clash; using it fails until one is removed.
    """
    if kind is not None and kind not in registry.GROUPS:
        raise typer.BadParameter(f"{kind!r} is not a plugin kind; use one of: {', '.join(registry.GROUPS)}",
                                 param_hint="--kind")
    if name is not None:
        _describe(name, kind, as_json)
        return
    rows = [{"kind": p.kind, "name": p.name, "distribution": p.distribution, "version": p.version,
             "clashes_with": list(p.clashes_with)}
            for p in registry.list_plugins(kind)]  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    clashing = any(row["clashes_with"] for row in rows)
    table = Table("kind", "name", "distribution", "version", *(["clash"] if clashing else []),
                  title="lolcats plugins", title_justify="left")
    for row in rows:
        cells = [row["kind"], row["name"], row["distribution"], row["version"]]
        if clashing:
            others = ", ".join(row["clashes_with"])
            cells.append(f"[red]also registered by {others}[/red]" if others else "")
        table.add_row(*cells)
    stdout.print(table)
    for clash in registry.clashes(kind):  # type: ignore[arg-type]
        stderr.print(f"[yellow]warning:[/yellow] {escape(clash.message)}; using it fails until this is fixed\n"
                     f"[dim]{escape(clash.hint or '')}[/dim]", highlight=False)


def _describe(name: str, kind: Optional[str], as_json: bool) -> None:
    """One plugin: where it comes from, its docstring and its parameters (imports that plugin)."""
    info = registry.find_plugin(name, kind)  # type: ignore[arg-type]
    cls = registry.load(info.kind, info.name)
    params = [{"name": n, "type": tp, "default": None if d is dataclasses.MISSING else d}
              for n, tp, d in registry.param_fields(cls)]
    doc = inspect.cleandoc(cls.__doc__ or "")
    if as_json:
        typer.echo(json.dumps({**dataclasses.asdict(info), "doc": doc, "params": params}, indent=2, default=repr))
        return
    console = stdout
    console.print(f"[bold]{info.name}[/bold] ({info.kind}) from {info.distribution} {info.version}: {info.target}")
    if doc:
        console.print(doc, markup=False, highlight=False)
    table = Table("parameter", "type", "default")
    for p in params:
        table.add_row(p["name"], p["type"], repr(p["default"]))
    console.print(table)
