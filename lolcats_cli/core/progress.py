"""How the engine reports progress without knowing about the terminal.

The core never imports rich: it calls a :class:`Reporter`; the CLI passes one that draws Rich progress bars
and tables on stderr, tests pass :class:`NullReporter` or a recording one.

A long step with no steps of its own (dequantizing a GGUF the first time, the evaluation before training)
runs inside ``with phase("what it does"):``; the CLI shows a spinner with that text (:func:`set_phase_handler`),
a library user sees nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

_phase_handler: Callable[[str], ContextManager[Any]] | None = None
_library_bars = True  # transformers' own progress bars while lolcats loads a model (the CLI hides them)


def show_library_bars(show: bool) -> None:
    """Whether transformers' own progress bars show while lolcats loads and caches models (the CLI turns
    them off unless --debug: its spinner says what is happening)."""
    global _library_bars
    _library_bars = show


def library_bars() -> ContextManager[Any]:
    """The context lolcats loads a model in: transformers' bars hidden unless :func:`show_library_bars`."""
    if _library_bars:
        return contextlib.nullcontext()
    from ..hf_compat import quiet_progress_bars

    return quiet_progress_bars()


def set_phase_handler(handler: Callable[[str], ContextManager[Any]] | None) -> Callable[[str], ContextManager[Any]] | None:
    """Show every :func:`phase` with ``handler(message)`` (a context manager); None shows nothing. Returns
    the handler it replaces."""
    global _phase_handler
    before, _phase_handler = _phase_handler, handler
    return before


@contextlib.contextmanager
def phase(message: str) -> Iterator[None]:
    """Run the block as a named phase (a spinner in the CLI, nothing in the library)."""
    if _phase_handler is None:
        yield
        return
    with _phase_handler(message):
        yield


@dataclass
class StepInfo:
    step: int  # optimizer updates done
    total_steps: int
    tokens: int  # training tokens seen so far
    tokens_per_s: float
    loss: float
    lr: float


@dataclass
class EvalInfo:
    step: int
    loss: float
    best: bool  # the best held-out loss so far
    details: dict[str, Any] = field(default_factory=dict)  # e.g. {"layers": [...]} for transfer


class Reporter(Protocol):
    def start(self, title: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, info: StepInfo) -> None: ...
    def evaluated(self, info: EvalInfo) -> None: ...
    def log(self, message: str) -> None: ...
    def finish(self) -> None: ...


class NullReporter:
    """Reports nothing."""

    def start(self, title: str, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, info: StepInfo) -> None:
        pass

    def evaluated(self, info: EvalInfo) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass
