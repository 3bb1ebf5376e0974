"""``lolcats init``: write a complete, commented recipe after a few questions (or none, from flags).

Asks in a terminal; never asks with ``--yes`` or when stdin is not a terminal (scripts, CI): then the flags
and the defaults fill every answer. A flag given on the command line skips its question.
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional

import typer

from ..core.recipe.init_recipe import (
    InitAnswers,
    check_answers,
    check_positive_int,
    format_tokens,
    next_commands,
    parse_tokens,
    render_recipe,
    resolve_answers,
    write_recipe,
)
from ..errors import ConfigError, LolcatsError

DEFAULT_PATH = Path("recipe.yaml")
Validator = Callable[[str], "bool | str"]  # questionary: True, or the message shown under the question
FLAGS = {"model": "--model", "feature_map": "--feature-map", "window": "--window", "window_size": "--window-size",
         "dataset": "--dataset", "tokens": "--tokens", "lora_rank": "--lora-rank", "output": "--output",
         "seq_len": "--seq-len"}

EPILOG = """[bold]Examples[/bold]

[dim]# answer a few questions (Enter keeps each default), write recipe.yaml[/dim]
[cyan]lolcats init[/cyan]

[dim]# no questions: the embedded default (SmolLM2-135M on pydoc), written to recipe.yaml[/dim]
[cyan]lolcats init --yes[/cyan]

[dim]# the paper's setup for Llama 3.1 8B, 20M tokens per stage[/dim]
[cyan]lolcats init llama.yaml --yes --model meta-llama/Llama-3.1-8B --dataset yahma/alpaca-cleaned --tokens 20M[/cyan]

[dim]# another feature map and window, replacing an existing file[/dim]
[cyan]lolcats init taylor.yaml --yes --feature-map taylor --window sliding --window-size 128 --force[/cyan]
"""


def command(
    path: Optional[Path] = typer.Argument(None, help=f"Where to write the recipe (default: {DEFAULT_PATH}).",
                                          show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Hub id, local folder, .gguf file, or smollm2-135m (the default)."),
    feature_map: Optional[str] = typer.Option(None, "--feature-map", help="A feature map from `lolcats plugins`."),
    window: Optional[str] = typer.Option(None, "--window", help="A window from `lolcats plugins`."),
    window_size: Optional[int] = typer.Option(None, "--window-size", help="Keys in the softmax window."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="pydoc, a hub dataset id, or a local file."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token budget per stage: 500k, 2M, 20M ..."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank of stage 2."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run directory (default: runs/<model>)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per training sequence."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Ask nothing: flags, then defaults, fill every answer."),
    force: bool = typer.Option(False, "--force", help="Replace the recipe file if it exists."),
) -> None:
    """Write a recipe: every setting of a run in one commented YAML file that opens with the commands to run.

    In a terminal, init asks one question per setting; a flag given on the command line skips its question.

    With [bold]--yes[/bold], or without a terminal (scripts, CI), init asks nothing: flags, then defaults.

    Ctrl-C during the questions writes nothing (exit code 130).
    """
    flags = {"model": model, "feature_map": feature_map, "window": window, "window_size": window_size,
             "dataset": dataset, "tokens": _flag_tokens(tokens), "lora_rank": lora_rank, "output": output,
             "seq_len": seq_len}
    given = {k: v for k, v in flags.items() if v is not None}
    answers = InitAnswers(**given)
    problems = check_answers(answers)
    if problems:
        plugins = " (`lolcats plugins` lists the installed ones)" if {"feature_map", "window"} & set(problems) else ""
        raise ConfigError([f"{FLAGS[k]}: {v}" for k, v in problems.items()], hint=f"fix the flags above{plugins}")
    interactive = not yes and sys.stdin.isatty() and sys.stdout.isatty()
    if not yes and not interactive:
        typer.echo("lolcats init: not a terminal, so no questions: the flags and defaults fill every answer "
                   "(pass --yes to say so and silence this note).", err=True)
    target, overwrite = path or DEFAULT_PATH, force
    try:
        if interactive:
            answers, target, overwrite = _wizard(given, path, force)
        written = write_recipe(target, render_recipe(answers, target), overwrite=overwrite)
    except KeyboardInterrupt:
        typer.echo("\ncancelled: nothing written", err=True)
        raise typer.Exit(130) from None
    _report(written, resolve_answers(answers))


def _flag_tokens(tokens: Optional[str]) -> Optional[int]:
    """``--tokens`` as an int, the error naming the flag."""
    if tokens is None:
        return None
    try:
        return parse_tokens(tokens)
    except LolcatsError as err:
        raise typer.BadParameter(f"{err.message}; {err.hint}", param_hint="--tokens") from None


def _report(path: Path, a: InitAnswers) -> None:
    """The path written and the commands to run next, on stdout (plain text: copy-pasteable)."""
    typer.echo(f"wrote {path}: {a.model}, feature map {a.feature_map}, window {a.window} (size {a.window_size}), "
               f"data {a.dataset}, {format_tokens(int(a.tokens or 0))} tokens per stage, LoRA rank {a.lora_rank}")
    typer.echo("next:")
    for line in next_commands(path, a.output or ""):
        typer.echo(f"  {line}")


# ------------------------------------------------------------------------------------------ the wizard
def _wizard(given: dict[str, Any], path: Optional[Path], force: bool) -> tuple[InitAnswers, Path, bool]:
    """Ask each question whose flag was not given; returns the answers, the recipe path, and whether an
    existing file may be replaced. Ctrl-C raises KeyboardInterrupt."""
    overwrite = _may_replace(path, force) if path is not None else force
    ask: dict[str, Any] = dict(given)
    if "model" not in ask:
        ask["model"] = _text("Base model: a hub id, a local folder, a .gguf file, or smollm2-135m (embedded)",
                             "smollm2-135m", _field_check("model"))
    d = resolve_answers(InitAnswers(model=ask["model"]))
    if "feature_map" not in ask:
        ask["feature_map"] = _select("Feature map of the linear attention", "feature_map", d.feature_map)
    if "window" not in ask:
        ask["window"] = _select("Softmax window", "window", d.window)
    if "window_size" not in ask:
        ask["window_size"] = int(_text("Window size (keys)", str(d.window_size),
                                       lambda v: check_positive_int(v, "window size") or True))
    if "dataset" not in ask:
        ask["dataset"] = _text("Training data: pydoc (offline), a hub dataset id, or a local "
                               ".json/.jsonl/.parquet/.txt file", str(d.dataset), _field_check("dataset"))
    if "tokens" not in ask:
        ask["tokens"] = parse_tokens(_text("Token budget per stage (e.g. 500k, 2M, 20M)",
                                           format_tokens(int(d.tokens or 0)), _tokens_check))
    if "lora_rank" not in ask:
        ask["lora_rank"] = int(_text("LoRA rank", str(d.lora_rank),
                                     lambda v: check_positive_int(v, "LoRA rank") or True))
    if "output" not in ask:
        ask["output"] = _text("Run directory", str(d.output),
                              lambda v: bool(v.strip()) or "give a folder, e.g. runs/my-run")
    if path is None:
        path = Path(_text("Save the recipe as", str(DEFAULT_PATH),
                          lambda v: (bool(v.strip()) and not Path(v).is_dir()) or "give a file name, e.g. recipe.yaml"))
        overwrite = _may_replace(path, force)
    return InitAnswers(**ask), path, overwrite


def _text(message: str, default: str, validate: Validator) -> str:
    """A free-text question; Enter keeps ``default``."""
    import questionary

    return questionary.text(message, default=default, validate=validate).unsafe_ask().strip()


def _select(message: str, kind: str, default: str) -> str:
    """A choice among the installed plugins of ``kind``, each shown with its distribution."""
    import questionary

    from ..core.model.registry import list_plugins

    plugins = list_plugins(kind)  # type: ignore[arg-type]
    width = max(len(p.name) for p in plugins)
    choices = [questionary.Choice(f"{p.name.ljust(width)}  ({p.distribution} {p.version})", value=p.name)
               for p in plugins]
    start = default if any(p.name == default for p in plugins) else plugins[0].name
    return questionary.select(message, choices=choices, default=start).unsafe_ask()


def _field_check(field: str) -> Validator:
    """A questionary validator: True, or the problem :func:`check_answers` finds with ``field``."""
    return lambda value: check_answers(InitAnswers(**{field: value})).get(field, True)


def _tokens_check(value: str) -> bool | str:
    """A questionary validator for the token budget."""
    try:
        parse_tokens(value)
    except LolcatsError as err:
        return f"{err.message}; {err.hint}"
    return True


def _may_replace(path: Path, force: bool) -> bool:
    """Whether ``path`` may be replaced: yes with --force or when it does not exist; else ask (no: exit 1)."""
    import questionary

    if force or not path.exists():
        return force
    if path.is_dir():
        raise LolcatsError(f"{path} is a directory, not a recipe file",
                           hint=f"give a file name, such as {path / 'recipe.yaml'}")
    if not questionary.confirm(f"{path} exists. Replace it?", default=False).unsafe_ask():
        typer.echo(f"kept {path}: nothing written (pass --force to replace it without asking)", err=True)
        raise typer.Exit(1)
    return True
