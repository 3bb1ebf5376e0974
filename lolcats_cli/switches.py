"""The spellings of an on/off environment switch (the ``LOLCATS_*`` variables), shared by every place that reads
one; what an unset value means stays with each reader."""

from __future__ import annotations

import os

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def switch(name: str, unset: str) -> bool | None:
    """The on/off environment switch ``name``: True (on), False (off) or None (unset or empty). ``unset`` says what
    an unset switch does (for the error). ValueError naming the value and the fix for anything else."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in ON + OFF:
        raise ValueError(f"{name}={os.environ[name]!r} is not a switch: set it to 1 (on) or 0 (off), or unset it "
                         f"({unset})")
    return value in ON


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET`` set and not 0): on any device,
    which the CPU tests use."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["OFF", "ON", "switch", "triton_interpreting"]
