"""Rich rendering for the engine's Reporter protocol: a progress bar on stderr and per-layer MSE tables;
and warnings that library code logs (``logging.getLogger("lolcats_cli...")``), printed on stderr."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
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


class ConsoleLogHandler(logging.Handler):
    """Prints log records on the stderr console: ``warning: <message>`` in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            stderr.print(f"[yellow]{level}:[/yellow] {escape(record.getMessage())}", highlight=False)
        except Exception:  # logging must never take the command down
            self.handleError(record)


def show_library_warnings(logger_name: str = "lolcats_cli") -> None:
    """Route warnings that lolcats' library code logs to the stderr console (once, however often called)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(h, ConsoleLogHandler) for h in logger.handlers):
        logger.addHandler(ConsoleLogHandler(logging.WARNING))


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


def report_interrupt(stop: KeyboardInterrupt, run_dir: Any, resume_command: list[str]) -> NoReturn:
    """Ctrl-C during ``transfer`` or ``finetune``: say the step reached, the last checkpoint and the exact
    command that continues the run (``resume_command``), then exit 130 (the shell's code for Ctrl-C)."""
    import shlex
    from pathlib import Path

    import typer
    from rich.markup import escape as esc

    from ..core.workspace import RESOLVED_RECIPE, has_checkpoint

    run_dir = Path(run_dir)
    step, total = getattr(stop, "step", None), getattr(stop, "total_steps", None)
    where = f" at step {step}/{total} of {stop.title}" if step is not None else ""
    if getattr(stop, "checkpoint", None) is not None:
        kept = f"the last checkpoint is step {stop.checkpoint_step} ({esc(str(stop.checkpoint))})"
    elif has_checkpoint(run_dir):
        where = where or " before training started"
        kept = f"the last checkpoint is kept in {esc(str(run_dir / 'checkpoints'))}"
    elif (run_dir / RESOLVED_RECIPE).exists():
        kept = "no checkpoint yet: --resume starts it again from step 0"
    else:
        stderr.print(f"[yellow]interrupted[/yellow]{where} before the first checkpoint: nothing to resume; "
                     "run the same command again to start over", soft_wrap=True, highlight=False)
        raise typer.Exit(130)
    stderr.print(f"[yellow]interrupted[/yellow]{where}; {kept}", soft_wrap=True, highlight=False)
    stderr.print(f"continue with: [bold]{esc(shlex.join(resume_command))}[/bold]", soft_wrap=True, highlight=False)
    raise typer.Exit(130)
