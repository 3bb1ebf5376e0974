"""How the engine reports progress without knowing about the terminal.

The core never imports rich: it calls a :class:`Reporter`; the CLI passes one that draws Rich progress bars
and tables on stderr, tests pass :class:`NullReporter` or a recording one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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
