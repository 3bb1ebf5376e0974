"""`lolcats transfer`: stage 1, train the linear attentions to mimic the softmax ones."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .reporting import RichReporter, layer_table, report_interrupt, stderr, stdout

EXAMPLES = """
[bold]Examples[/bold]

  [dim]# the embedded default: SmolLM2-135M-Instruct on offline text, about 10 minutes on a laptop CPU[/dim]
  lolcats transfer

  [dim]# the paper's recipe for Llama 3.1 8B on one GPU[/dim]
  lolcats transfer --model meta-llama/Llama-3.1-8B --output runs/llama31-8b

  [dim]# any recipe, with overrides as dotted keys[/dim]
  lolcats transfer --recipe recipes/smollm2-135m.yaml transfer.max_steps=20 attention.window=sliding

  [dim]# continue a run that was interrupted[/dim]
  lolcats transfer --output runs/smollm2-135m --resume

  [dim]# what a recipe would need (GPU memory, disk, time) on this machine, without loading weights[/dim]
  lolcats transfer --recipe recipes/llama-3.1-405b.yaml --dry-run

  [dim]# block-wise transfer, blocks of 9 layers spread over 8 GPUs (torchrun underneath)[/dim]
  lolcats transfer --recipe recipes/llama-3.1-405b.yaml --gpus 8
  torchrun --nproc-per-node 8 -m lolcats_cli transfer --recipe recipes/llama-3.1-405b.yaml
"""


def choose_recipe(model: Optional[str], recipe: Optional[str], revision: Optional[str], overrides: list[str]):
    """The recipe to run: --recipe if given; else for --model the shipped recipe named after it or made for
    what it is (its architecture and size), else the paper's defaults, saying which on stderr; with neither,
    the embedded default. Overrides apply last."""
    from ..core.recipe.init_recipe import recipe_for_model
    from ..core.recipe.recipe import Recipe, apply_overrides, load_recipe

    extra = list(overrides)
    if model is not None:
        extra.append(f"model.name={json.dumps(model)}")
    if revision is not None:
        extra.append(f"model.revision={json.dumps(revision)}")
    if recipe is not None:
        return load_recipe(recipe, extra)
    if model is None:
        base = load_recipe("smollm2-135m")
    else:
        base, why = recipe_for_model(model)
        stderr.print(f"recipe: {why}", style="dim", markup=False, highlight=False, soft_wrap=True)
    return Recipe.from_dict(apply_overrides(base.to_dict(), extra))


def transfer(
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides as dotted.key=value.", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="A YAML recipe path or the name of a shipped recipe."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory (default: runs/<model>)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    block_size: Optional[int] = typer.Option(None, "--block-size", min=1, help="Block-wise transfer in blocks of this many layers (transfer.block_size)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="Run on this many GPUs of this machine (starts torchrun: blocks spread over them, or joint transfer sharded with FSDP2)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the GPU memory, disk and time the recipe needs here, and its mode; load no weights."),
) -> None:
    """Stage 1: swap every softmax attention for a hybrid linear one and train it to mimic the original."""
    from ..core.progress import NullReporter
    from ..core.train.transfer import run_transfer

    if block_size is not None:
        overrides = [*(overrides or []), f"transfer.block_size={block_size}"]
    if dry_run:
        _dry_run(model, recipe, revision, overrides or [], output, resume, gpus, as_json)
        return
    if gpus is not None and gpus > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(gpus)
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:  # one display: rank 0's
        from ..core.progress import set_phase_handler

        set_phase_handler(None)
    if resume:
        if output is None:
            raise typer.BadParameter("--resume needs the --output folder of the run to continue", param_hint="--output")
        ignored = [*(overrides or []), *(f"--{n} {v}" for n, v in (("model", model), ("recipe", recipe),
                                                                    ("revision", revision)) if v)]
        if ignored:
            raise typer.BadParameter(
                f"--resume continues the run with its own settings ({output / 'recipe.resolved.yaml'}), so "
                f"{', '.join(ignored)} would be ignored; drop them to resume, or start a new run with another --output",
                param_hint="--resume",
            )
        rec = None
    else:
        rec = choose_recipe(model, recipe, revision, overrides or [])
        if output is None:
            from ..core.recipe.init_recipe import run_name

            output = Path(rec.output.dir) if rec.output.dir else Path("runs") / run_name(rec.model.name)
    if rank == 0:
        stderr.print(f"[bold]lolcats transfer[/bold] → {output}")
    reporter = RichReporter() if rank == 0 else NullReporter()
    try:
        result = run_transfer(rec, output, resume=resume, overwrite=overwrite, reporter=reporter, device=device)
    except KeyboardInterrupt as stop:
        again = ["lolcats", "transfer", "--output", str(output), "--resume", *(["--device", device] if device else [])]
        if gpus is not None and gpus > 1:
            again += ["--gpus", str(gpus)]
        report_interrupt(stop, output, again)
    if rank != 0:
        return
    if as_json:
        stdout.print_json(data={
            "run_dir": str(result.run_dir), "layers": result.layers, "steps": result.steps,
            "tokens_seen": result.tokens_seen, "wall_time_s": result.wall_time_s, "best_step": result.best_step,
        })
        return
    how = f"best step {result.best_step}" if result.best_step is not None else "block-wise, the best step of each block"
    stdout.print(layer_table(result.layers, f"attention transfer: held-out MSE per layer ({how})", "mse_after"))
    improved = sum(r["mse_after"] < r["mse_before"] for r in result.layers)
    stdout.print(
        f"{improved}/{len(result.layers)} layers improved · {result.steps} steps · {result.tokens_seen:,} tokens · "
        f"{result.wall_time_s / 60:.1f} min\nrun directory: {result.run_dir}\n"
        f"next: lolcats finetune {result.run_dir}   or   lolcats eval {result.run_dir}"
    )


def _relaunch_under_torchrun(gpus: int) -> None:
    """``--gpus N``: run this same command as N processes under torchrun (``torch.distributed.run``)."""
    import torch

    from ..errors import ConfigError

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > found:
        raise ConfigError(
            f"--gpus {gpus}: this machine has {found} CUDA GPU{'s' if found != 1 else ''}",
            f"pass --gpus {found} or fewer" if found else
            "on CPUs start the processes yourself: torchrun --nproc-per-node N -m lolcats_cli transfer ... (gloo)",
        )
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "lolcats_cli", *args]
    stderr.print(f"[dim]starting {gpus} processes: {' '.join(command[1:])}[/dim]", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def _dry_run(model, recipe, revision, overrides, output, resume, gpus, as_json) -> None:
    """``--dry-run``: the plan of the recipe (or of the run in --output with --resume) on this machine."""
    from ..core.recipe.recipe import load_recipe
    from ..core.runs.rundir import RESOLVED_RECIPE
    from ..core.train.transfer_modes.plan import plan_transfer, render_plan

    if resume:
        if output is None:
            raise typer.BadParameter("--resume needs the --output folder of the run to continue", param_hint="--output")
        rec = load_recipe(output / RESOLVED_RECIPE, overrides)
    else:
        rec = choose_recipe(model, recipe, revision, overrides)
    plan = plan_transfer(rec, processes=gpus, output=output)
    if as_json:
        stdout.print_json(data=plan.to_dict())
    else:
        stdout.print(render_plan(plan))
