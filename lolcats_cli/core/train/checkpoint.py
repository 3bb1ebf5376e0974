"""Atomic, pickle-free files: safetensors for tensors, JSON/YAML for the rest.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target,
so a killed run never leaves a half-written file behind: readers see the old file or the new one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (detached, contiguous, on CPU) to a safetensors file atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            # No metadata at all rather than an empty mapping: safetensors 0.8 writes an unreadable header for
            # an empty tensor dict with metadata={} (the step-0 optimizer state is such a dict).
            save_file(flat, tmp, metadata=dict(metadata) if metadata else None)
        except SafetensorError as e:  # it wraps I/O errors ("... (os error 28)"): give them back as OSError
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), tmp) from e

    _atomic_write(path, write)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def save_json(path: Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def load_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)

