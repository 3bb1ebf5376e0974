"""Rich rendering for the engine's Reporter protocol: a progress bar on stderr and per-layer MSE tables;
and warnings that library code logs (``logging.getLogger("lolcats_cli...")``), printed on stderr."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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


ETA_WINDOW = 20  # steps in the moving window of step times


def estimate_eta(step_seconds: Sequence[float], evals: Sequence[tuple[int, float]], done: int, total: int,
                 window: int = ETA_WINDOW) -> float | None:
    """Seconds left after step ``done``: ``total - done`` steps at the mean of the last ``window`` step
    times, plus the evaluations at steps ``done`` to ``total`` (the one at ``done`` runs right after its
    step) at the mean cost of the last three measured ones.

    ``step_seconds``: wall time of each training step (evaluations excluded); ``evals``: ``(step, seconds)``
    of the evaluations measured so far. The trainer evaluates every ``eval_every`` steps and at the last
    step; ``eval_every`` is read off the evaluated steps (their greatest common divisor, the last step left
    out), so until the first evaluation the ETA counts training steps only. None before any step.
    """
    if not step_seconds or total <= done:
        return None if not step_seconds else 0.0
    recent = list(step_seconds)[-window:]
    eta = (total - done) * sum(recent) / len(recent)
    steps = [s for s, _ in evals if 0 < s < total]
    if steps:
        every = math.gcd(*steps)
        left = total // every - (done - 1) // every + (1 if total % every else 0)  # the one at ``done`` is next
        costs = [t for _, t in evals][-3:]
        eta += left * sum(costs) / len(costs)
    return eta


def format_eta(seconds: float | None) -> str:
    """``0:04:36``; ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def status(message: str, console: Console | None = None) -> Iterator[None]:
    """A spinner with ``message`` on a terminal while the block runs (a plain line in logs and pipes)."""
    from rich.errors import LiveError

    console = console or stderr
    spinner = console.status(escape(message), spinner="dots") if console.is_terminal else None
    try:
        if spinner is not None:
            spinner.__enter__()
    except LiveError:  # a progress bar is live already: say it in a line instead
        spinner = None
    if spinner is None:
        console.print(f"[dim]{escape(message)}[/dim]", highlight=False)
    try:
        yield
    finally:
        if spinner is not None:
            spinner.__exit__(None, None, None)


class RichReporter:
    """Progress (step, tokens, tokens/s, loss, ETA) and evaluation tables, all on stderr.

    The ETA is :func:`estimate_eta` over the measured step and evaluation times (Rich's own remaining-time
    column is blank for slow steps and ignores the evaluations). An evaluation runs between the ``step()``
    of its step and ``evaluated()``; a training step between the previous call and its ``step()``.
    """

    def __init__(self, console: Console | None = None, show_tables: bool = True) -> None:
        self.console = console or stderr
        self.show_tables = show_tables
        self.progress: Progress | None = None
        self.task: Any = None
        self._last_line = 0.0  # when not on a terminal: time of the last plain progress line
        self._mark: float | None = None  # end of the last step, evaluation or start
        self._step_at: tuple[int, float] | None = None  # (step, when its step() came)
        self.step_seconds: list[float] = []
        self.evals: list[tuple[int, float]] = []

    def start(self, title: str, total_steps: int, done_steps: int) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(title, total=total_steps, completed=done_steps, stats="", eta=format_eta(None))
        self._mark = time.monotonic()

    def eta(self, done: int, total: int) -> float | None:
        return estimate_eta(self.step_seconds, self.evals, done, total)

    def step(self, info) -> None:
        now = time.monotonic()
        if self._mark is not None:
            self.step_seconds.append(now - self._mark)
            del self.step_seconds[:-ETA_WINDOW]
        self._mark, self._step_at = now, (info.step, now)
        eta = format_eta(self.eta(info.step, info.total_steps))
        stats = f"{info.tokens:>9,} tok  {info.tokens_per_s:>7.0f} tok/s"
        if math.isfinite(info.loss):
            stats += f"  loss {info.loss:.4g}"
        if self.progress is not None:
            self.progress.update(self.task, completed=info.step, stats=stats, eta=eta)
        if not self.console.is_terminal and (time.monotonic() - self._last_line > 30 or info.step == info.total_steps):
            # Logs and CI have no live bar: a plain line at most every 30 s.
            self._last_line = time.monotonic()
            loss = f" · loss {info.loss:.4g}" if math.isfinite(info.loss) else ""
            lr = f" · lr {info.lr:.2g}" if info.lr else ""
            self.console.print(f"step {info.step}/{info.total_steps} · {info.tokens:,} tok · {info.tokens_per_s:.0f} tok/s"
                               f"{loss}{lr} · ETA {eta}", highlight=False)

    def evaluated(self, info) -> None:
        now = time.monotonic()
        if self._step_at is not None and self._step_at[0] == info.step:
            self.evals.append((info.step, now - self._step_at[1]))
        self._mark = now
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

    from ..core.runs.rundir import CHECKPOINTS, has_checkpoint, is_run_dir

    run_dir = Path(run_dir)
    step, total = getattr(stop, "step", None), getattr(stop, "total_steps", None)
    where = f" at step {step}/{total} of {stop.title}" if step is not None else ""
    if getattr(stop, "checkpoint", None) is not None:
        kept = f"the last checkpoint is step {stop.checkpoint_step} ({esc(str(stop.checkpoint))})"
    elif has_checkpoint(run_dir):
        where = where or " before training started"
        kept = f"the last checkpoint is kept in {esc(str(run_dir / CHECKPOINTS))}"
    elif is_run_dir(run_dir):
        kept = "no checkpoint yet: --resume starts it again from step 0"
    else:
        stderr.print(f"[yellow]interrupted[/yellow]{where} before the first checkpoint: nothing to resume; "
                     "run the same command again to start over", soft_wrap=True, highlight=False)
        raise typer.Exit(130)
    stderr.print(f"[yellow]interrupted[/yellow]{where}; {kept}", soft_wrap=True, highlight=False)
    stderr.print(f"continue with: [bold]{esc(shlex.join(resume_command))}[/bold]", soft_wrap=True, highlight=False)
    raise typer.Exit(130)
