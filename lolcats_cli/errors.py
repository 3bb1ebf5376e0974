"""Errors a user can act on. The CLI's one error boundary shows them as a panel and exits 1 (2 for usage).

Every message names the offending value; ``hint`` says what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LolcatsError(Exception):
    """Base of every error meant for the user (no traceback without --debug)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ConfigError(LolcatsError):
    """Invalid recipe, override or plugin parameters; ``errors`` holds every problem found, each prefixed
    by its key path."""

    exit_code = 2

    def __init__(self, errors: list[str] | str, hint: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        head = self.errors[0] if len(self.errors) == 1 else f"{len(self.errors)} problems:\n" + "\n".join(
            f"  - {e}" for e in self.errors
        )
        super().__init__(head, hint)


class PluginError(LolcatsError):
    """An unknown, clashing or broken plugin."""


class ModelError(LolcatsError):
    """A model that cannot be found, loaded or converted."""


class DataError(LolcatsError):
    """A dataset that cannot be found, read, or is too small."""


class TrainingError(LolcatsError):
    """A run that cannot go on (non-finite loss, say); the last good checkpoint is kept."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """'did you mean X? ' (or '') followed by nothing: callers append the list of what exists."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""
