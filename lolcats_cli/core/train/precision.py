"""Numeric precision of forward passes, shared by training, evaluation and passkey scoring."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def autocast_for(device: torch.device) -> ContextManager[object]:
    """bf16 autocast on GPU, plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["autocast_for"]
