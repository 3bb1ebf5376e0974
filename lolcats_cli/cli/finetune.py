"""`lolcats finetune`: stage 2, recover quality with LoRA on top of a transfer run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .reporting import RichReporter, report_interrupt, stderr, stdout

EXAMPLES = """
[bold]Examples[/bold]

  [dim]# LoRA on the embedded default's transfer run → runs/smollm2-135m-finetune[/dim]
  lolcats finetune runs/smollm2-135m

  [dim]# a shorter run with a larger rank[/dim]
  lolcats finetune runs/smollm2-135m --output runs/smol-r16 finetune.lora.rank=16 finetune.max_steps=50

  [dim]# continue an interrupted finetune[/dim]
  lolcats finetune runs/smollm2-135m --output runs/smol-r16 --resume

  [dim]# data parallel over 2 processes, the frozen weights sharded with FSDP2 (gloo on CPU, nccl on GPUs)[/dim]
  torchrun --nproc-per-node 2 -m lolcats_cli finetune runs/smollm2-135m
"""


def finetune(
    run_dir: Path = typer.Argument(..., help="A finished `lolcats transfer` run directory.", show_default=False),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides as dotted.key=value.", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Finetune run directory (default: RUN_DIR-finetune)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the finetune run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing finetune run directory."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Stage 2: LoRA on the q, k, v, o projections of a linearized model, feature maps frozen."""
    from ..core.progress import set_phase_handler
    from ..core.train.finetune import run_finetune

    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun, one display: rank 0's
    if rank != 0:
        set_phase_handler(None)
    else:
        stderr.print(f"[bold]lolcats finetune[/bold] {run_dir} → {output or str(run_dir) + '-finetune'}")
    try:
        result = run_finetune(run_dir, output, overrides or [], resume=resume, overwrite=overwrite, reporter=RichReporter(), device=device)
    except KeyboardInterrupt as stop:
        out = output or run_dir.with_name(run_dir.name + "-finetune")
        again = ["lolcats", "finetune", str(run_dir), "--output", str(out), "--resume",
                 *(["--device", device] if device else [])]
        report_interrupt(stop, out, again)
    if rank != 0:
        return
    data = {
        "run_dir": str(result.run_dir), "steps": result.steps, "tokens_seen": result.tokens_seen,
        "wall_time_s": result.wall_time_s, "heldout_ppl_before": result.ppl_before, "heldout_ppl_after": result.ppl_after,
    }
    if as_json:
        stdout.print_json(data=data)
        return
    stdout.print(
        f"held-out perplexity {result.ppl_before:.2f} → [bold]{result.ppl_after:.2f}[/bold] · {result.steps} steps · "
        f"{result.tokens_seen:,} tokens · {result.wall_time_s / 60:.1f} min\nrun directory: {result.run_dir}\n"
        f"next: lolcats eval {result.run_dir}   or   lolcats chat {result.run_dir}"
    )
