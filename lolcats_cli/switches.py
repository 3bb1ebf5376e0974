"""The spellings of an on/off environment switch (the ``LOLCATS_*`` variables), shared by every place that reads
one; what an unset or other value means stays with each reader."""

from __future__ import annotations

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")

__all__ = ["OFF", "ON"]
