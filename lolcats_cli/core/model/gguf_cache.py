"""A cache of dequantized GGUF models, so that only the first load pays for parsing the GGUF file.

transformers reads a GGUF in pure Python: 30 to 80 seconds for SmolLM2-135M on 2 CPU cores, most of it
parsing metadata. The first load saves the dequantized fp32 model and its tokenizer with
``save_pretrained`` (about 540 MB for SmolLM2-135M, 4 bytes per parameter); later loads read that folder in
about 2 seconds.

Where: ``$LOLCATS_CACHE_DIR/gguf``, else ``$XDG_CACHE_HOME/lolcats/gguf``, else ``~/.cache/lolcats/gguf``;
one folder per GGUF *content*, ``<file stem>-<key>-tf<transformers major>``: the key is a SHA-256 of the
file's size and its first and last MiB (not its path or modification time), so the same file in two virtual
environments, copied or renamed, shares one entry.

Eviction: after each new entry, only the ``LOLCATS_GGUF_CACHE_KEEP`` (default 3) most recently used entries
are kept, and older ones are removed while the cache holds more than ``LOLCATS_GGUF_CACHE_MAX_GB`` (default
10) GB; the entry in use is never removed. ``LOLCATS_GGUF_CACHE=0`` turns the cache off; deleting the folder
clears it. A cache that cannot be written is skipped silently.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...switches import OFF

COMPLETE = "lolcats-gguf-cache.complete"  # written last: a folder without it is ignored; its mtime = last use
KEEP_ENV, MAX_GB_ENV = "LOLCATS_GGUF_CACHE_KEEP", "LOLCATS_GGUF_CACHE_MAX_GB"
DEFAULT_KEEP, DEFAULT_MAX_GB = 3, 10.0
_EDGE = 2**20  # bytes hashed at each end of the file
_STALE_TMP_S = 6 * 3600  # a temporary folder this old is left over from a killed write


def enabled() -> bool:
    return os.environ.get("LOLCATS_GGUF_CACHE", "1").strip().lower() not in OFF


def cache_root() -> Path:
    if os.environ.get("LOLCATS_CACHE_DIR"):
        return Path(os.environ["LOLCATS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lolcats"


def content_key(gguf_path: str | os.PathLike[str]) -> str:
    """A key for the file's content: SHA-256 of its size, its first MiB and its last MiB (24 hex digits)."""
    path = Path(gguf_path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            digest.update(f.read(_EDGE))
    return digest.hexdigest()[:24]


def _suffix(gguf_path: str | os.PathLike[str]) -> str:
    import transformers

    major = transformers.__version__.split(".")[0]  # save_pretrained's format is stable within a major version
    return f"-{content_key(gguf_path)}-tf{major}"


def cache_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """The cache folder a new entry for ``gguf_path`` is written to: ``<file stem>-<content key>-tf<major>``
    (it may not exist yet; :func:`lookup` also finds an entry written under another file name)."""
    return cache_root() / "gguf" / f"{Path(gguf_path).stem}{_suffix(gguf_path)}"


def lookup(gguf_path: str | os.PathLike[str]) -> Path | None:
    """The complete cache folder of ``gguf_path``'s content, or None (also when the cache is off); marks it
    used (for eviction)."""
    if not enabled():
        return None
    try:
        suffix, root = _suffix(gguf_path), cache_root() / "gguf"
        found = [f for f in root.glob(f"*{suffix}") if not f.name.startswith(".") and (f / COMPLETE).is_file()]
        if not found:
            return None
        folder = cache_dir(gguf_path) if cache_dir(gguf_path) in found else sorted(found)[0]
        os.utime(folder / COMPLETE)
    except OSError:
        return None
    return folder


def store(gguf_path: str | os.PathLike[str], model: Any, tokenizer: Any) -> Path | None:
    """Save a dequantized fp32 ``model`` and its ``tokenizer`` as the cache of ``gguf_path``, then evict old
    entries (:func:`evict`).

    The folder is written under a temporary name and renamed when complete, so concurrent runs and
    interrupted writes never leave a half folder in use. Returns the folder, or None if not written.
    """
    if not enabled():
        return None
    tmp: str | None = None
    try:
        found = lookup(gguf_path)
        if found is not None:  # written meanwhile (a concurrent run), maybe under another file name
            return found
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
        evict(keep=final)
        return final
    except Exception:  # a cache that cannot be written must never fail the run
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def limits() -> tuple[int, float]:
    """``(entries to keep, GB cap)`` from :data:`KEEP_ENV` and :data:`MAX_GB_ENV`; ConfigError if malformed."""
    keep, max_gb = os.environ.get(KEEP_ENV, "").strip(), os.environ.get(MAX_GB_ENV, "").strip()
    try:
        n = int(keep) if keep else DEFAULT_KEEP
        gb = float(max_gb) if max_gb else DEFAULT_MAX_GB
    except ValueError:
        n, gb = -1, -1.0
    if n < 1 or not gb > 0:
        raise ConfigError(f"{KEEP_ENV}={keep or DEFAULT_KEEP!s} / {MAX_GB_ENV}={max_gb or DEFAULT_MAX_GB!s}: expected "
                          "a whole number of entries >= 1 and a size in GB > 0",
                          f"e.g. {KEEP_ENV}=2 {MAX_GB_ENV}=5, or unset them for {DEFAULT_KEEP} entries and "
                          f"{DEFAULT_MAX_GB:g} GB")
    return n, gb


def entries() -> list[tuple[Path, float, int]]:
    """Every complete cache entry as ``(folder, last use, bytes)``, most recently used first."""
    root = cache_root() / "gguf"
    out = []
    for folder in root.iterdir() if root.is_dir() else []:
        marker = folder / COMPLETE
        if folder.name.startswith(".") or not marker.is_file():
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        out.append((folder, marker.stat().st_mtime, size))
    return sorted(out, key=lambda e: e[1], reverse=True)


def evict(keep: Path | None = None) -> list[Path]:
    """Remove the entries beyond the :func:`limits` (least recently used first, never ``keep``) and temporary
    folders of writes killed hours ago; returns the folders removed."""
    n, max_gb = limits()
    removed = []
    total = 0
    for i, (folder, _, size) in enumerate(entries()):
        if keep is not None and folder == keep:
            total += size
            continue
        if i >= n or total + size > max_gb * 1e9:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        else:
            total += size
    root = cache_root() / "gguf"
    for tmp in root.glob(".*") if root.is_dir() else []:
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


__all__ = ["enabled", "cache_root", "cache_dir", "content_key", "lookup", "store", "evict", "entries", "limits",
           "COMPLETE", "KEEP_ENV", "MAX_GB_ENV"]
