"""`lolcats chat`: talk to a linearized model, streamed, with constant memory per sequence.

The loop and the session live in :mod:`lolcats_cli.core.decode.chat`; this module only loads, renders and reads
the keyboard. Replies go to stdout; loading messages and warnings to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from .reporting import stderr, stdout

EXAMPLES = """
[bold]Examples[/bold]

  [dim]# chat with a transfer (or finetune) run; /help inside lists the commands[/dim]
  lolcats chat runs/smollm2-135m

  [dim]# one answer on stdout, for scripts[/dim]
  lolcats chat runs/smollm2-135m -p "Name three felines." --temperature 0

  [dim]# also show what the original softmax model says[/dim]
  lolcats chat runs/smollm2-135m-finetune --compare --system "Answer in one sentence."

  [dim]# keep 256 exact keys per KV head beside the window: details far back can be recalled[/dim]
  lolcats chat runs/smollm2-135m-finetune --recall 256

  [dim]# a folder written by `lolcats export --format hf`[/dim]
  lolcats chat exports/smollm2-135m --max-new-tokens 128
"""


def chat(
    path: Path = typer.Argument(..., metavar="RUN_DIR|EXPORT_DIR", help="A transfer or finetune run directory, or a `lolcats export --format hf` folder.", show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one message on stdout and exit ('-' reads it from stdin).", show_default=False),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt.", show_default=False),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    compare: bool = typer.Option(False, "--compare", help="Also show the original model's reply (softmax attention, LoRA off)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    reread: bool = typer.Option(False, "--reread", help="Read the whole conversation again every turn instead of keeping the state between turns."),
    recall: Optional[int] = typer.Option(None, "--recall", min=0, help="Keep a recall cache of this many exact keys per KV head (the ones the linear state recalls worst), so details beyond the window can be recalled; constant memory, no CUDA graph. Run directories only.", show_default=False),
) -> None:
    """Chat with a linearized model: streamed replies in constant memory per sequence.

    The state survives between turns: each turn reads only its new tokens. On CUDA each token is one replay of a
    CUDA graph over preallocated state buffers (LOLCATS_STATIC_DECODE=0 turns it off).
    Inside the chat: /help, /reset, /system TEXT, /stats (speed, time to first token, tokens and memory in the
    state vs a softmax KV cache), /quit.
    For several lines, end a line with a backslash, or open and close a block with three double quotes.
    """
    from ..core.decode.chat import (
        ChatSession, load_chat_model, original_caveat, require_original, use_recall_cache,
    )  # fmt: skip

    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")
    if prompt is not None and not prompt.strip():
        raise typer.BadParameter("the prompt is empty; pass the message to answer, e.g. -p 'Hello'", param_hint="--prompt")
    start = time.perf_counter()
    stderr.print(f"[dim]loading {path} ...[/dim]")
    model, tokenizer, description = load_chat_model(path, device, keep_adapter=compare)
    if compare:
        require_original(model)
        if caveat := original_caveat(model):
            stderr.print(f"[yellow]{caveat}[/yellow]")
    if recall is not None:
        layers = use_recall_cache(model, recall)
        stderr.print(f"[dim]recall cache: {recall} exact keys per KV head in each of {layers} layers[/dim]")
    session = ChatSession(model, tokenizer, system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          keep_state=not reread)
    device_name = next(model.parameters()).device
    stderr.print(f"[dim]{description} on {device_name}, ready in {time.perf_counter() - start:.1f} s[/dim]")
    if not session.has_template:
        stderr.print("[yellow]the tokenizer has no chat template: using a plain User:/Assistant: transcript[/yellow]")

    if prompt is not None:
        _print_plain(session.reply(prompt), sys.stdout)
        if compare:
            stderr.print("[bold magenta]original model[/bold magenta]")
            _print_plain(session.original_reply(), sys.stderr)
        return
    _interactive(session, compare)


def _interactive(session: Any, compare: bool) -> None:
    from ..core.decode.repl import run_repl

    stderr.print("[bold]lolcats chat[/bold] · /help for commands · /quit or Ctrl-D to leave")

    def answer(text: str) -> None:
        _stream(stdout, "lolcats", "bold cyan", session.reply(text))
        if compare:
            _stream(stdout, "original", "bold magenta", session.original_reply())

    run_repl(_read_line, lambda s: stdout.out(s, end="", highlight=False), session, on_message=answer)


def _read_line(prompt: str) -> str:
    """One line from the keyboard, with line editing when readline is available."""
    try:
        import readline  # noqa: F401  (input() gains history and editing)
    except ImportError:
        pass
    return stdout.input(Text(prompt, style="bold green"))


def _stream(console: Console, name: str, style: str, pieces: Iterable[str]) -> None:
    """A header line, then the reply as it is decoded."""
    console.print(Text(name, style=style))
    for piece in pieces:
        console.out(piece, end="", highlight=False)
    console.out("")


def _print_plain(pieces: Iterable[str], file: Any) -> None:
    """The reply alone, flushed piece by piece (``-p``: nothing else goes to stdout)."""
    for piece in pieces:
        file.write(piece)
        file.flush()
    file.write("\n")
    file.flush()


__all__ = ["chat", "EXAMPLES"]
