"""The dequantized-GGUF cache: keyed on the file's content, old entries evicted, limits from the environment."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lolcats_cli.core.model import gguf_cache
from lolcats_cli.errors import ConfigError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOLCATS_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("LOLCATS_GGUF_CACHE", gguf_cache.KEEP_ENV, gguf_cache.MAX_GB_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / "gguf"


def _gguf(path: Path, size: int = 3 * 2**20, last: int = 0) -> Path:
    data = bytearray(bytes(range(256)) * (size // 256))
    data[-1] = last
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_the_key_is_the_content_not_the_path_or_the_time(tmp_path) -> None:
    a = _gguf(tmp_path / "venv-a" / "model.gguf")
    b = tmp_path / "venv-b" / "renamed.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, (1_000_000, 1_000_000))
    assert gguf_cache.content_key(a) == gguf_cache.content_key(b)
    c = _gguf(tmp_path / "other" / "model.gguf", last=1)  # same size and path name, another last byte
    assert gguf_cache.content_key(c) != gguf_cache.content_key(a)
    assert gguf_cache.cache_dir(a).name.startswith("model-") and gguf_cache.cache_dir(c) != gguf_cache.cache_dir(a)


def test_a_stored_model_is_found_from_a_copy_elsewhere(tmp_path, tiny_model_dir, tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    a = _gguf(tmp_path / "venv-a" / "model.gguf")
    folder = gguf_cache.store(a, model, tiny_tokenizer)
    assert folder is not None and (folder / "config.json").is_file() and (folder / gguf_cache.COMPLETE).is_file()
    b = tmp_path / "venv-b" / "copy.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    assert gguf_cache.lookup(b) == folder == gguf_cache.lookup(a)
    assert gguf_cache.store(b, model, tiny_tokenizer) == folder  # no second copy
    assert [e[0] for e in gguf_cache.entries()] == [folder]


def _entry(cache: Path, name: str, size: int, used: float) -> Path:
    folder = cache / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(size))
    marker = folder / gguf_cache.COMPLETE
    marker.write_text("x")
    os.utime(marker, (used, used))
    return folder


def test_only_the_most_recently_used_entries_are_kept(cache, monkeypatch) -> None:
    folders = [_entry(cache, f"m{i}-k{i}-tf5", 1000, 1_000_000 + i) for i in range(5)]  # m4 used last
    half = cache / ".m9-k9-tf5-abc"  # a write killed long ago
    half.mkdir()
    os.utime(half, (1_000_000, 1_000_000))
    assert sorted(gguf_cache.evict()) == sorted([*folders[:2], half])  # default: keep 3
    monkeypatch.setenv(gguf_cache.KEEP_ENV, "1")
    assert gguf_cache.evict(keep=folders[2]) == [folders[3]]  # the entry in use stays, even if older
    assert sorted(p.name for p in cache.iterdir()) == ["m2-k2-tf5", "m4-k4-tf5"]


def test_the_size_cap_removes_the_oldest_first(cache, monkeypatch) -> None:
    folders = [_entry(cache, f"m{i}-k{i}-tf5", 4000, 1_000_000 + i) for i in range(3)]
    monkeypatch.setenv(gguf_cache.MAX_GB_ENV, str(9000 / 1e9))  # room for two
    assert gguf_cache.evict() == [folders[0]]
    monkeypatch.setenv(gguf_cache.MAX_GB_ENV, str(1000 / 1e9))  # room for none: the one in use stays
    assert gguf_cache.evict(keep=folders[2]) == [folders[1]]


@pytest.mark.parametrize(("name", "value"), [(gguf_cache.KEEP_ENV, "0"), (gguf_cache.KEEP_ENV, "three"),
                                             (gguf_cache.MAX_GB_ENV, "-1")])
def test_malformed_limits_name_the_variable_and_the_fix(monkeypatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}={value}") as err:
        gguf_cache.limits()
    assert "unset them for 3 entries and 10 GB" in err.value.hint
