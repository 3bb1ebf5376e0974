"""The ``lolcats`` command line: the Typer app, its global options, and the one error boundary.

Each command lives in its own module ``lolcats_cli/cli/<module>.py`` that defines ``command`` (or a function
named after the command): a typed function whose signature and docstring are the CLI, plus optionally
``EPILOG`` (or ``EXAMPLES``), the copy-pasteable examples shown after the help. Adding a command is one
line in :data:`COMMANDS`.
Every command is a :class:`Command`, whose help shows flags without a ``<bool>`` label and arguments as
``RUN_DIR``; the examples go in ``EPILOG``/``EXAMPLES`` only (not also in the docstring), so they show once.
A command module that fails to import still shows in ``lolcats --help`` (marked unavailable) and reports
its import error when run, so one broken command never breaks the others.

No module here imports torch at import time: ``lolcats --help`` must stay fast.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .. import __version__
from ..errors import LolcatsError
from ..core.progress import set_phase_handler, show_library_bars
from .reporting import make_console, show_library_warnings, status

# One line per command, in the order ``lolcats --help`` lists them: (command name, module in lolcats_cli.cli).
COMMANDS: list[tuple[str, str]] = [
    ("init", "init"),
    ("transfer", "transfer"),
    ("finetune", "finetune"),
    ("eval", "eval"),
    ("chat", "chat"),
    ("export", "export"),
    ("plugins", "plugins"),
]


def _tidy_params(params: list[Any]) -> list[Any]:
    """Help labels the way users read them: a flag shows no ``<bool>`` value label (it takes no value), and
    an argument shows as ``RUN_DIR`` (``OVERRIDES...`` when it takes several) rather than ``run_dir``."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif isinstance(param, TyperArgument) and param.metavar is None and param.name:
            param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
    return params


def _usage(params: list[Any], ctx: typer.Context) -> list[str]:
    """Usage-line pieces: ``RUN_DIR`` when required, ``[RUN_DIR]`` when optional, ``[OVERRIDES]...`` when
    repeated (never ``{run_dir}``)."""
    pieces = []
    for param in params:
        if isinstance(param, TyperArgument):
            name, dots = (param.metavar[:-3], "...") if param.metavar.endswith("...") else (param.metavar, "")
            pieces.append((name if param.required else f"[{name}]") + dots)
        else:
            pieces.extend(param.get_usage_pieces(ctx))
    return pieces


class Command(TyperCommand):
    """A command whose help shows flags without a value label and arguments as ``RUN_DIR``."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _tidy_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return ([self.options_metavar] if self.options_metavar else []) + _usage(self.get_params(ctx), ctx)


class Group(TyperGroup):
    """The ``lolcats`` group, with the same help labels as :class:`Command`."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _tidy_params(super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    name="lolcats",
    help="Linearize pretrained LLMs with LoLCATs: attention transfer, then LoRA.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stderr = make_console(stderr=True)
show_library_warnings()  # registry warnings (a LOLCATS_PLUGINS name nobody installed, ...) on stderr
set_phase_handler(status)  # long steps without steps of their own (first GGUF load, step-0 evaluation): a spinner


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lolcats {__version__}")
        raise typer.Exit()


# Commands that run a model: they pick torch's thread count (core/threads.py) and say which, once.
COMPUTE_COMMANDS = {"transfer", "finetune", "eval", "chat", "export"}


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch (default: $LOLCATS_THREADS, else the cores free now).",
        show_default=False,
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Linearize pretrained LLMs with LoLCATs: attention transfer, then LoRA."""
    argv = ctx.obj.get("argv", ()) if isinstance(ctx.obj, dict) else ()
    asks_help = bool({"--help", "-h"} & set(argv))  # help runs no model: nothing to say about threads
    if ctx.invoked_subcommand in COMPUTE_COMMANDS and not asks_help:
        from ..core.threads import apply_threads

        stderr.print(f"[dim]{escape(apply_threads(threads))}[/dim]", highlight=False, soft_wrap=True)


def _unavailable(target: typer.Typer, name: str, module: str, exc: BaseException) -> None:
    """Register ``name`` as a command that explains why its module could not be imported."""
    reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")

    @target.command(
        name=name,
        help=f"Unavailable: {escape(reason)}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def _broken(ctx: typer.Context) -> None:
        raise LolcatsError(
            f"command {name!r} is unavailable: lolcats_cli.cli.{module} failed to import ({reason})",
            hint="reinstall lolcats (pip install -e .), or run with --debug and report the traceback",
        ) from exc


def register_commands(target: typer.Typer, commands: list[tuple[str, str]]) -> None:
    """Add each ``(name, module)`` command to ``target``; a module that fails to import becomes a stub."""
    for name, module in commands:
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
            function = getattr(mod, "command", None) or getattr(mod, name.replace("-", "_"))
            epilog = getattr(mod, "EPILOG", None) or getattr(mod, "EXAMPLES", None)
            target.command(name=name, epilog=epilog, cls=Command)(function)
        except Exception as exc:  # keep --help and every other command working
            _unavailable(target, name, module, exc)


register_commands(app, COMMANDS)


def _report(err: BaseException, debug: bool) -> int:
    """Print ``err`` as one panel on stderr (after the traceback with --debug); return the exit code."""
    if debug:
        stderr.print_exception(show_locals=False)
    if isinstance(err, LolcatsError):
        body = Text(err.message)
        if err.hint:
            body.append("\n\n" + err.hint, style="dim")
        title, code = type(err).__name__, err.exit_code
    else:
        body = Text(f"{type(err).__name__}: {err}")
        if not debug:
            body.append("\n\nunexpected error: run with --debug for the traceback", style="dim")
        title, code = "unexpected error", 1
    stderr.print(Panel(body, title=f"[bold red]{title}", title_align="left", border_style="red", expand=False))
    return code


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lolcats`` script; the one place errors become panels and exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in args:  # deprecation notices about transformers' and peft's own internals, not the user's
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|torch)(\.|$)")
    show_library_bars("--debug" in args)  # transformers' loading bars: our spinner says what is happening
    try:
        app(args=args, prog_name="lolcats", standalone_mode=True, obj={"argv": args})
    except SystemExit:
        raise
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as err:  # the error boundary
        sys.exit(_report(err, debug="--debug" in args))


if __name__ == "__main__":
    main()
