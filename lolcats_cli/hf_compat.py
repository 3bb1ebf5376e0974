"""Every transformers internal that lolcats relies on, in one place, checked loudly.

lolcats plugs into transformers below its public API: it replaces a decoder layer's attention module (so it
receives whatever arguments the decoder layer passes), keeps its state in the layers of a transformers
``Cache``, calls the architecture's own RoPE function, and reads the cache a forward pass or ``generate()``
returns. transformers renames these from time to time (5.24 renamed ``past_key_values`` to ``cache``);
an argument we do not read is silently dropped into ``**kwargs``, and a model then decodes without state.

This module is the only place that knows those names. What it cannot recognise raises
:class:`TransformersCompatError` naming the installed transformers and the tested range, never a silent
fallback. It is bundled into every ``hf`` export (the export's runtime imports it), so a model exported
today keeps working, or fails loudly, under a later transformers.

Tested range: :data:`TESTED_RANGE` (the oldest and newest minor releases the suite passed on; pyproject's
bounds say the same).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import transformers
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .errors import ModelError

TESTED_RANGE: tuple[str, str] = ("5.17", "5.24")  # keep in step with pyproject.toml's transformers bounds

# Names transformers has given the attention forward's KV-cache argument, newest first:
# ``cache`` (5.24+), ``past_key_values`` (5.0 - 5.23), ``past_key_value`` (4.x).
CACHE_ARGS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")
# Keyword arguments that look cache-like by name but are not the cache.
NOT_CACHE: frozenset[str] = frozenset({"use_cache", "cache_position", "cache_implementation", "cache_config"})
# Where a model output / generate() output keeps its cache, newest first.
OUTPUT_CACHE_FIELDS: tuple[str, ...] = ("cache", "past_key_values")

__all__ = [
    "CACHE_ARGS",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "TESTED_RANGE",
    "TransformersCompatError",
    "attention_cache",
    "cache_kwarg",
    "check_cache",
    "check_replaceable_layer",
    "output_cache",
    "last_logits_kwargs",
    "peek_attention_cache",
    "quiet_progress_bars",
    "rotary_function",
    "transformers_version",
]


class TransformersCompatError(ModelError):
    """transformers handed lolcats something it does not know: a renamed argument, an unknown cache class."""


def transformers_version() -> str:
    return str(getattr(transformers, "__version__", "unknown"))


def _fix() -> str:
    low, high = TESTED_RANGE
    return (
        f"lolcats is tested with transformers {low} to {high}.x (installed: {transformers_version()}); "
        f"install one of those (pip install 'transformers>={low},<{_next_minor(high)}') or upgrade lolcats"
    )


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


def _cache_like(name: str, value: Any) -> bool:
    if value is None or name in NOT_CACHE:
        return False
    return isinstance(value, (Cache, CacheLayerMixin)) or "cache" in name.lower() or name.startswith("past")


# ------------------------------------------------------------------------------- the attention's arguments


def attention_cache(extra: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> Any:
    """The KV cache a decoder layer passed to an attention module (None when it passed none), removed from
    ``kwargs``. ``extra``: positional arguments after ``(hidden_states, position_embeddings, attention_mask)``
    (the cache is the first, in every release so far).

    Raises :class:`TransformersCompatError` for a cache-like argument under a name this module does not
    know, or two different caches under two names: decoding without state is never silent.
    """
    given = [(name, kwargs.pop(name)) for name in CACHE_ARGS if name in kwargs]
    if extra:
        given.append(("<positional argument 4>", extra[0]))
    if len(extra) > 1:
        raise TransformersCompatError(
            f"{where}: {len(extra) + 3} positional arguments were passed to the attention; lolcats reads "
            "(hidden_states, position_embeddings, attention_mask, cache)",
            hint=_fix(),
        )
    unknown = sorted(name for name, value in kwargs.items() if _cache_like(name, value))
    if unknown:
        raise TransformersCompatError(
            f"{where}: transformers {transformers_version()} passed the attention an argument lolcats does not "
            f"know: {', '.join(unknown)} (known cache arguments: {', '.join(CACHE_ARGS)}); decoding would run "
            "without its state",
            hint=_fix(),
        )
    caches = [(name, value) for name, value in given if value is not None]
    if len({id(value) for _, value in caches}) > 1:
        raise TransformersCompatError(
            f"{where}: two different caches were passed ({', '.join(name for name, _ in caches)})",
            hint="pass the cache once, as `cache=` (transformers >= 5.24) or `past_key_values=`",
        )
    return caches[0][1] if caches else None


def peek_attention_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The cache in an attention call's ``(args, kwargs)`` without removing it (for forward pre-hooks);
    ``args`` are all positional arguments, hidden_states first."""
    return attention_cache(tuple(args[3:4]), dict(kwargs), "attention pre-hook")


# ---------------------------------------------------------------------------------------------- caches


def check_cache(cache: Any, where: str) -> Cache:
    """``cache`` itself when it is a transformers ``Cache`` lolcats can keep a hybrid state in."""
    if not isinstance(cache, Cache):
        raise TransformersCompatError(
            f"{where}: the cache is a {type(cache).__name__}, not a transformers Cache "
            f"(transformers {transformers_version()})",
            hint="pass lolcats_cli.core.decode.cache.make_cache(model) or transformers.DynamicCache(), or leave "
            "the cache to generate()",
        )
    return cache


def check_replaceable_layer(layer: Any, layer_idx: int) -> None:
    """An empty cache layer lolcats may swap for its own hybrid-state layer: a ``DynamicLayer`` (or a
    subclass: sliding window, quantized). Static and other layer kinds preallocate keys for compiled
    decoding; swapping them would break that contract, so they raise."""
    if isinstance(layer, DynamicLayer):
        return
    raise TransformersCompatError(
        f"layer {layer_idx}: a cache layer of type {type(layer).__name__} (transformers {transformers_version()}) "
        "cannot hold a linear-attention state",
        hint="use the default dynamic cache: drop cache_implementation= / a StaticCache from generate(), or pass "
        "lolcats_cli.core.decode.cache.make_cache(model)",
    )


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model.forward`` takes its cache: ``cache`` or ``past_key_values``."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TransformersCompatError(
        f"{type(model).__name__}.forward takes no cache argument lolcats knows ({', '.join(CACHE_ARGS[:2])})",
        hint=_fix(),
    )


def output_cache(output: Any) -> Any:
    """The cache a model forward or ``generate()`` returned (``output.cache`` or ``output.past_key_values``)."""
    for name in OUTPUT_CACHE_FIELDS:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------------------------- rotary


def rotary_function(module: str, name: str) -> Callable[..., Any]:
    """The architecture's ``apply_rotary_pos_emb(q, k, cos, sin) -> (q, k)`` from transformers' modeling
    module; TransformersCompatError when it moved."""
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise TransformersCompatError(
            f"transformers {transformers_version()} has no {module}.{name} ({type(exc).__name__}: {exc})",
            hint=_fix(),
        ) from exc
    if not callable(fn):
        raise TransformersCompatError(f"{module}.{name} is not a function", hint=_fix())
    return fn


# ------------------------------------------------------------------------------------------------- logits

# Names transformers has given the causal LMs' argument that computes logits for the last N positions only.
LOGITS_TO_KEEP_ARGS: tuple[str, ...] = ("logits_to_keep", "num_logits_to_keep")


def last_logits_kwargs(model: Any) -> dict[str, int]:
    """Keyword arguments that make ``model``'s forward compute logits for the last position only (a prefill
    then skips a ``(T, vocab)`` matmul); ``{}`` for a model whose forward takes none of the known names."""
    params = inspect.signature(type(model).forward).parameters
    return next(({name: 1} for name in LOGITS_TO_KEEP_ARGS if name in params), {})


# ------------------------------------------------------------------------------------------ progress bars

# transformers' own tqdm bars while it reads a model: "Loading weights" and "Writing model shards" go through
# transformers.utils.logging.tqdm (switched by its module flag ``_tqdm_active``; its public
# ``disable_progress_bar`` would also hide the hub's download bars, which stay), "Converting and de-quantizing
# GGUF tensors" through a plain tqdm the GGUF loader imports (replaced for the duration). Cosmetic: what is not
# found is left alone.
GGUF_LOADER_MODULE = "transformers.modeling_gguf_pytorch_utils"


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' loading bars while the block runs (lolcats shows its own spinner instead)."""
    from transformers.utils import logging as hf_logging

    gguf_loader = importlib.import_module(GGUF_LOADER_MODULE)
    bar = getattr(gguf_loader, "tqdm", None)
    shown = getattr(hf_logging, "_tqdm_active", None)
    if shown is not None:
        hf_logging._tqdm_active = False
    if bar is not None:
        gguf_loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar
        if shown is not None:
            hf_logging._tqdm_active = shown
