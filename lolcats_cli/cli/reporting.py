"""Rich rendering for the engine's Reporter protocol: a progress bar on stderr and per-layer MSE tables."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table



def make_console(stderr: bool = False) -> Console:
    """A console that writes full-width tables into logs and pipes too: Rich would wrap them at 80 columns
    when the stream is not a terminal; there we use COLUMNS if set, else 160."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 160
    return Console(stderr=stderr, width=width)


stderr = make_console(stderr=True)
stdout = make_console()


def layer_table(layers: list[dict[str, Any]], title: str, now_key: str = "mse") -> Table:
    """Layer, MSE before, MSE now, reduction %, mean window factor."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("layer", "MSE before", "MSE now", "reduction", "window factor"):
        table.add_column(name, justify="right")
    for row in layers:
        reduction = row.get("reduction_pct", 0.0)
        style = "green" if reduction > 0 else "red"
        table.add_row(
            str(row["layer"]),
            f"{row['mse_before']:.3e}",
            f"{row[now_key]:.3e}",
            f"[{style}]{reduction:+.1f}%[/{style}]",
            f"{row['window_factor']:.3f}",
        )
    return table


class RichReporter:
    """Progress (step, tokens, tokens/s, loss, ETA) and evaluation tables, all on stderr."""

    def __init__(self, console: Console | None = None, show_tables: bool = True) -> None:
        self.console = console or stderr
        self.show_tables = show_tables
        self.progress: Progress | None = None
        self.task: Any = None
        self._last_line = 0.0  # when not on a terminal: time of the last plain progress line


    def start(self, title: str, total_steps: int, done_steps: int) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tokens]:>9,} tok  {task.fields[tps]:>7.0f} tok/s  loss {task.fields[loss]:.4g}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(title, total=total_steps, completed=done_steps, tokens=0, tps=0.0, loss=float("nan"))

    def step(self, info) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=info.step, tokens=info.tokens, tps=info.tokens_per_s, loss=info.loss)
        if not self.console.is_terminal and (time.monotonic() - self._last_line > 30 or info.step == info.total_steps):
            # Logs and CI have no live bar: a plain line at most every 30 s.
            self._last_line = time.monotonic()
            self.console.print(
                f"step {info.step}/{info.total_steps} · {info.tokens:,} tok · {info.tokens_per_s:.0f} tok/s · "
                f"loss {info.loss:.4g} · lr {info.lr:.2g}"
            )

    def evaluated(self, info) -> None:
        layers = info.details.get("layers")
        mark = " (best)" if info.best else ""
        if layers and self.show_tables and info.step > 0:
            self.console.print(layer_table(layers, f"held-out attention MSE at step {info.step}{mark}"))
        else:
            self.console.print(f"[dim]step {info.step}: held-out loss {info.loss:.4g}{mark}[/dim]")

    def log(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
