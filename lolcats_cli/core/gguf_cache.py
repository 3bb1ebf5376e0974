"""A cache of dequantized GGUF models, so that only the first load pays for parsing the GGUF file.

transformers reads a GGUF in pure Python: 30 to 80 seconds for SmolLM2-135M on 2 CPU cores, most of it
parsing metadata. The first load saves the dequantized fp32 model and its tokenizer with
``save_pretrained`` (about 540 MB for SmolLM2-135M); later loads read that folder in about 2 seconds.

Where: ``$LOLCATS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lolcats``, else ``~/.cache/lolcats``; one folder per
GGUF file, keyed by its absolute path, size, modification time and the transformers version.
``LOLCATS_GGUF_CACHE=0`` turns the cache off. A cache that cannot be written is skipped silently.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

COMPLETE = "lolcats-gguf-cache.complete"  # written last: a folder without it is ignored


def enabled() -> bool:
    return os.environ.get("LOLCATS_GGUF_CACHE", "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_root() -> Path:
    if os.environ.get("LOLCATS_CACHE_DIR"):
        return Path(os.environ["LOLCATS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lolcats"


def cache_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """The cache folder for one GGUF file (it may not exist yet)."""
    import transformers

    path = Path(gguf_path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return cache_root() / "gguf" / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def lookup(gguf_path: str | os.PathLike[str]) -> Path | None:
    """The complete cache folder of ``gguf_path``, or None (also when the cache is off)."""
    if not enabled():
        return None
    try:
        folder = cache_dir(gguf_path)
    except OSError:
        return None
    return folder if (folder / COMPLETE).is_file() else None


def store(gguf_path: str | os.PathLike[str], model: Any, tokenizer: Any) -> Path | None:
    """Save a dequantized fp32 ``model`` and its ``tokenizer`` as the cache of ``gguf_path``.

    The folder is written under a temporary name and renamed when complete, so concurrent runs and
    interrupted writes never leave a half folder in use. Returns the folder, or None if not written.
    """
    if not enabled():
        return None
    tmp: str | None = None
    try:
        final = cache_dir(gguf_path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / COMPLETE).write_text(f"{Path(gguf_path).resolve()}\n")
        if final.exists():  # a stale or concurrent copy: keep the complete one
            if (final / COMPLETE).is_file():
                return final
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tmp = None
        return final
    except Exception:  # a cache that cannot be written must never fail the run
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["enabled", "cache_root", "cache_dir", "lookup", "store", "COMPLETE"]
