"""`lolcats eval`: a linearized run beside its softmax teacher and two baselines, on perplexity, attention
MSE, passkey retrieval and lm-eval-harness tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .reporting import RichReporter, stderr, stdout

EXAMPLES = """
[bold]Examples[/bold]

  [dim]# all four rows on the run's held-out text, passkey at 512/1024/2048 tokens[/dim]
  lolcats eval runs/smollm2-135m

  [dim]# your own text, longer contexts, and two lm-eval tasks on 200 examples each[/dim]
  lolcats eval runs/smollm2-135m --text book.txt --contexts 1024,4096 --tasks piqa,arc_easy --limit 200

  [dim]# a plain model (teacher and sink-window rows only), machine-readable[/dim]
  lolcats eval --model smollm2-135m --passkey 512,1024 --json

  [dim]# beside them, the model with a recall cache of 64 exact keys per KV head (passkey beyond the window)[/dim]
  lolcats eval runs/smollm2-135m --recall 64 --passkey 1024,2048

  [dim]# a local lm-eval task (its YAML in my_tasks/), 0-shot[/dim]
  lolcats eval runs/smollm2-135m --tasks my_task --include-path my_tasks --num-fewshot 0
"""

TITLES = {"teacher": "teacher", "sink_window": "sink window", "linearized": "linearized", "linear_zeroed": "linear zeroed",
          "linearized_recall": "linearized + recall cache"}


def _ints(value: Optional[str], flag: str) -> list[int]:
    """``"512,2048"`` -> ``[512, 2048]``; ``""`` or ``"none"`` -> ``[]``."""
    if value is None or value.strip().lower() in ("", "none"):
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 512,2048; got {value!r}", param_hint=flag) from None


def _limit(value: Optional[str]) -> int | float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"expected a count (200) or a fraction below 1 (0.1); got {value!r}", param_hint="--limit") from None
    if number <= 0:
        raise typer.BadParameter(f"must be positive; got {value!r}", param_hint="--limit")
    return int(number) if number >= 1 and number.is_integer() else number


def _num(value: float | None, fmt: str = ".2f") -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "[red]inf[/red]" if value > 0 else "nan"
    return f"{value:{fmt}}" if value < 1e5 else f"{value:.3g}"


def summary_table(report: Any) -> Table:
    """Rows teacher / sink window / linearized / linear zeroed x ppl at each context, ppl past 1024, passkey."""
    table = Table(title=f"lolcats eval: {report.source} ({report.text}, {report.text_tokens:,} tokens)",
                  title_justify="left", header_style="bold")
    table.add_column("row")
    long = [c for c in report.contexts if c > 1024]
    for c in report.contexts:
        table.add_column(f"ppl@{c}", justify="right")
    for c in long:
        table.add_column(f"ppl >1024 @{c}", justify="right")
    for n in report.passkey_lengths:
        table.add_column(f"passkey@{n}", justify="right")
    for name, row in report.rows.items():
        cells = [_num(row.perplexity.get(c)) for c in report.contexts]
        cells += [_num(row.perplexity_past_1024.get(c)) for c in long]
        cells += [f"{100 * row.passkey[n]:.0f}%" if n in row.passkey else "-" for n in report.passkey_lengths]
        table.add_row(TITLES.get(name, name), *cells)
    return table


def recall_hint(report: Any) -> str | None:
    """A line for a run whose linearized row finds the passkey in under half the prompts at some length while no
    recall-cache row ran: the linear state alone rarely retrieves a detail from beyond the window."""
    row = report.rows.get("linearized")
    if row is None or "linearized_recall" in report.rows:
        return None
    missed = [n for n, hit in sorted(row.passkey.items()) if hit < 0.5]
    if not missed:
        return None
    return (f"passkey@{','.join(map(str, missed))} under 50% on the linearized row: add --recall 64 for a row with a "
            "recall cache (exact keys the linear state recalls worst, constant memory; on the shipped GPU recipe "
            "6 to 9 of 10 prompts at 1K to 4K tokens, README 'Quality, measured'), and chat with the same --recall")


def mse_table(report: Any) -> Table | None:
    """Per-layer attention MSE against the teacher, one column per linearized row."""
    rows = {n: r.attention_mse for n, r in report.rows.items() if r.attention_mse}
    if not rows:
        return None
    table = Table(title=f"attention MSE vs teacher ({report.mse_context} tokens)", title_justify="left", header_style="bold")
    table.add_column("layer", justify="right")
    for name in rows:
        table.add_column(TITLES.get(name, name), justify="right")
    for layer in sorted(next(iter(rows.values()))):
        table.add_row(str(layer), *[f"{mse[layer]:.3e}" for mse in rows.values()])
    return table


def lm_eval_table(report: Any) -> Table | None:
    """lm-eval metrics (value ± stderr) per task, one column per row."""
    if not report.tasks:
        return None
    table = Table(title="lm-eval-harness", title_justify="left", header_style="bold")
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for name in report.rows:
        table.add_column(TITLES.get(name, name), justify="right")
    tasks = sorted({t for r in report.rows.values() for t in r.lm_eval})
    for task in tasks:
        metrics = sorted({m for r in report.rows.values() for m in r.lm_eval.get(task, {}) if not m.endswith("_stderr")})
        for metric in metrics:
            cells = []
            for row in report.rows.values():
                values = row.lm_eval.get(task, {})
                value, err = values.get(metric), values.get(f"{metric}_stderr")
                cells.append("-" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err is not None and math.isfinite(err) else ""))
            table.add_row(task, metric, *cells)
    return table


def eval_command(
    run_dir: Optional[Path] = typer.Argument(None, help="A finished `lolcats transfer` or `lolcats finetune` run directory.", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Evaluate a plain model instead (hub id, folder or .gguf): teacher and sink rows only."),
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file for perplexity (default: the run's held-out split, or pydoc)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="A dataset for perplexity instead (as data.dataset: pydoc, a hub id or a local file)."),
    contexts: str = typer.Option("512,2048", "--contexts", help="Perplexity context lengths, comma-separated ('none' to skip)."),
    passkey: str = typer.Option("512,1024,2048", "--passkey", help="Passkey prompt lengths, comma-separated ('none' to skip)."),
    passkey_n: int = typer.Option(20, "--passkey-n", help="Passkey prompts per length."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated (needs pip install 'lolcats\\[eval]')."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples for lm-eval (default: each task's own)."),
    limit: Optional[str] = typer.Option(None, "--limit", help="lm-eval examples per task: a count, or a fraction below 1."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="A folder of extra lm-eval task YAML files."),
    max_tokens: int = typer.Option(32768, "--max-tokens", help="At most this many tokens per context length for perplexity (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the passkey prompts and lm-eval sampling."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout (nothing else)."),
    recall: Optional[int] = typer.Option(None, "--recall", help="Add a row with a recall cache of this many keys per KV head: the keys the linear state recalls worst, kept exactly (inference only)."),
) -> None:
    """Evaluate a linearized run beside its teacher, a 64+4 sink-window softmax, and its window alone."""
    from ..core.eval.evaluate import evaluate_run

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if not as_json:
        stderr.print(f"[bold]lolcats eval[/bold] {run_dir or model or ''}")
    report = evaluate_run(
        run_dir, model, text_file=text, dataset=dataset, contexts=_ints(contexts, "--contexts"),
        passkey_lengths=_ints(passkey, "--passkey"), passkey_n=passkey_n, seed=seed, tasks=task_list,
        num_fewshot=num_fewshot, limit=_limit(limit), include_path=include_path, device=device,
        max_tokens=max_tokens or None, reporter=RichReporter(), recall_slots=recall,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    for table in (summary_table(report), mse_table(report), lm_eval_table(report)):
        if table is not None:
            stdout.print(table)
    footer = f"{report.wall_time_s / 60:.1f} min · seed {report.seed}"
    if report.passkey_lengths:  # --passkey none: no passkey prompts were run, so none to count
        footer += f" · passkey {report.passkey_n} prompts per length"
    if report.softmax_layers:
        footer += (f" · layers {report.softmax_layers} kept as softmax attention (their KV cache grows with the "
                   "context; every other layer's state is constant)")
    stdout.print(f"[dim]{footer}[/dim]")
    if hint := recall_hint(report):
        stdout.print(f"[dim]{hint}[/dim]")


command = eval_command  # the name lolcats_cli.cli.main looks for
