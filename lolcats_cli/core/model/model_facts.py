"""What a model is, read without loading its weights, and the shipped recipe that fits it.

``lolcats transfer --model /path/x.gguf`` (or a local folder, or a cached hub id) gets the shipped recipe
of the model it *is*, not only of the name it has: :func:`read_model_facts` reads the architecture and
shape from a GGUF file's header (a few key/value pairs, no tensor data) or from ``config.json``, and
:func:`match_recipe` picks the shipped recipe with the same shape (layers and hidden size, then vocabulary
and context length), else the one closest in parameter count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Any, BinaryIO

# The model each shipped recipe was written for: (layers, hidden size, vocabulary, context length, parameters).
RECIPE_MODELS: dict[str, tuple[int, int, int, int, int]] = {
    "smollm2-135m": (30, 576, 49152, 8192, 134_515_008),
    "mistral-7b-v0.1": (32, 4096, 32000, 32768, 7_241_732_096),
    "llama-3-8b": (32, 4096, 128256, 8192, 8_030_261_248),
    "llama-3.1-8b": (32, 4096, 128256, 131072, 8_030_261_248),
    "llama-3.1-70b": (80, 8192, 128256, 131072, 70_553_706_496),
    "llama-3.1-405b": (126, 16384, 128256, 131072, 405_853_388_800),
}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """The shape of a model: ``architecture`` (GGUF ``general.architecture`` or ``config.model_type``)."""

    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int | None
    context_length: int | None
    parameters: int | None

    def describe(self) -> str:
        size = f", {_count(self.parameters)} parameters" if self.parameters else ""
        return f"a {self.architecture} model with {self.num_layers} layers of width {self.hidden_size}{size}"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


# ------------------------------------------------------------------------------------------- GGUF header
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == 8:
        return _string(f)
    if kind == 9:  # an array: skipped unless kept (the vocabulary is tens of thousands of strings)
        item, n = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS and not keep:
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
            return None
        values = [_value(f, item, keep) for _ in range(n)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """``(metadata, parameters)`` of a GGUF file: its scalar key/values (arrays left out) and the number of
    weights its tensors hold (from their shapes; no tensor data is read)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        tensors, kvs = _read(f, "<Q"), _read(f, "<Q")
        meta = {}
        for _ in range(kvs):
            key = _string(f)
            value = _value(f, _read(f, "<I"), keep=False)
            if value is not None:
                meta[key] = value
        parameters = 0
        for _ in range(tensors):
            _string(f)
            dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
            _read(f, "<I"), _read(f, "<Q")  # type, offset
            parameters += math.prod(dims)
    return meta, parameters


def _gguf_facts(path: Path) -> ModelFacts | None:
    meta, parameters = read_gguf_header(path)
    arch = meta.get("general.architecture")
    layers, hidden = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
    if not (arch and layers and hidden):
        return None
    return ModelFacts(arch, int(layers), int(hidden), meta.get(f"{arch}.vocab_size"),
                      meta.get(f"{arch}.context_length"), parameters or None)


# ---------------------------------------------------------------------------------------------- config
def _config_facts(config: dict[str, Any]) -> ModelFacts | None:
    config = config.get("text_config", config)
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if not (isinstance(layers, int) and isinstance(hidden, int)):
        return None
    vocab, ffn = config.get("vocab_size"), config.get("intermediate_size") or 4 * hidden
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden
    embeddings = (vocab or 0) * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return ModelFacts(str(config.get("model_type") or "unknown"), layers, hidden, vocab,
                      config.get("max_position_embeddings"), layers * per_layer + embeddings + hidden)


def read_model_facts(name: str, gguf_file: str | None = None, revision: str | None = None) -> ModelFacts | None:
    """The shape of model ``name`` (a .gguf path, a folder, or a hub id already in the local cache), without
    loading weights, importing torch or touching the network; None when it cannot be read."""
    from . import hub

    path = Path(name).expanduser()
    try:
        if path.is_file():
            return _gguf_facts(path)
        if path.is_dir():
            if gguf_file:
                return _gguf_facts(path / gguf_file)
            return _config_facts(json.loads((path / "config.json").read_text(encoding="utf-8")))
        cached = hub.cached_file(name, "config.json", revision)
        return _config_facts(json.loads(Path(cached).read_text(encoding="utf-8"))) if cached else None
    except Exception:  # an unreadable or unknown model: the loader says why, later
        return None


def match_recipe(facts: ModelFacts, available: set[str] | None = None) -> tuple[str, str]:
    """``(shipped recipe name, why)`` for a model of shape ``facts``: the recipe for the same layers and width
    (ties broken by vocabulary, then context length), else the one closest in parameter count."""
    models = {n: m for n, m in RECIPE_MODELS.items() if available is None or n in available}
    if not models:
        raise ValueError("no shipped recipe to choose from")
    same = [n for n, m in models.items() if (m[0], m[1]) == (facts.num_layers, facts.hidden_size)]
    if same:
        best = max(same, key=lambda n: (models[n][2] == facts.vocab_size, models[n][3] == facts.context_length))
        return best, f"it is {facts.describe()}, the shape {best} was written for"
    params = facts.parameters or 1
    best = min(models, key=lambda n: abs(math.log(models[n][4] / params)))
    return best, (f"it is {facts.describe()}; no shipped recipe is for that shape, and {best} "
                  f"({_count(models[best][4])} parameters) is the closest in size")


__all__ = ["ModelFacts", "RECIPE_MODELS", "read_gguf_header", "read_model_facts", "match_recipe"]
