"""Atomic, pickle-free files: safetensors for tensors, JSON/YAML for the rest; and finding the newest readable
training checkpoint (:func:`find_checkpoint`, the trainer's layout: see :mod:`.trainer`).

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target,
so a killed run never leaves a half-written file behind: readers see the old file or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ...errors import TrainingError

log = logging.getLogger(__name__)  # damaged checkpoints; the CLI prints these on stderr


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


# ------------------------------------------------------------------------------------- training checkpoints

CHECKPOINT_FILES = ("state.json", "trainable.safetensors", "optimizer.safetensors")


@dataclasses.dataclass
class Checkpoint:
    folder: Path
    state: dict[str, Any]
    trainable: dict[str, Tensor] | None = None  # None when read without tensors
    moments: dict[str, Tensor] | None = None


def error_text(err: BaseException) -> str:
    """``"Type: message"`` on one line (for warnings and errors that name a damaged file)."""
    return f"{type(err).__name__}: {err}".replace("\n", " ")


def _candidates(ckpt_dir: Path, warn: bool) -> Iterator[Path]:
    """Step folders to try, best first: the one ``latest.json`` names, then every other complete folder
    (``state.json`` is written last), newest first. An unreadable ``latest.json`` is warned about."""
    pointer, named = ckpt_dir / "latest.json", None
    if pointer.exists():
        try:
            named = ckpt_dir / str(load_json(pointer)["folder"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            if warn:
                log.warning(f"{pointer} is unreadable ({error_text(e)}); looking for the newest complete checkpoint")
    if named is not None:
        yield named
    folders = sorted((f for f in ckpt_dir.glob("step-*") if f.is_dir()), key=lambda f: f.name, reverse=True)
    yield from (f for f in folders if f != named and (f / "state.json").exists())


def find_checkpoint(ckpt_dir: Path, *, tensors: bool = True, warn: bool = True) -> Checkpoint | None:
    """The newest checkpoint in ``ckpt_dir`` whose files all read back, or None if it holds no checkpoint.

    A damaged file (truncated, say) is warned about by name and the previous checkpoint is used instead;
    if every checkpoint there is damaged, TrainingError names the files.
    """
    ckpt_dir, bad = Path(ckpt_dir), []
    for folder in _candidates(ckpt_dir, warn):
        names = CHECKPOINT_FILES if tensors else CHECKPOINT_FILES[:1]
        try:
            loaded = {}
            for name in names:
                path = folder / name
                loaded[name] = load_json(path) if name.endswith(".json") else load_tensors(path)
                if name == "state.json":
                    int(loaded[name]["step"])  # a state that parses but is not ours counts as damaged
        except Exception as e:  # noqa: BLE001 -- whatever a damaged file raises, the next checkpoint is tried
            bad.append(f"{path} ({error_text(e)})")
            if warn:
                log.warning(f"checkpoint file {path} is unreadable ({error_text(e)}); "
                            "falling back to the previous checkpoint")
            continue
        if bad and warn:
            log.warning(f"using the checkpoint of step {loaded['state.json']['step']} in {folder} instead")
        return Checkpoint(folder, loaded["state.json"], loaded.get("trainable.safetensors"),
                          loaded.get("optimizer.safetensors"))
    if bad:
        raise TrainingError(
            f"no readable checkpoint in {ckpt_dir}: " + "; ".join(bad),
            "restore the folder from a backup, or start the run again with --overwrite (its progress is lost)",
        )
    return None


def latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(step folder, state)`` of the newest checkpoint in ``ckpt_dir`` whose state reads back, or None
    (quietly: :meth:`Trainer.fit` is the one that warns about damaged files)."""
    try:
        found = find_checkpoint(ckpt_dir, tensors=False, warn=False)
    except TrainingError:
        return None
    return None if found is None else (found.folder, found.state)
