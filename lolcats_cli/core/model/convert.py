"""Convert a Hugging Face causal LM in place: swap each chosen layer's softmax attention for a
:class:`~.linear_attention.LinearizedAttention`, and manage the new parameters afterwards.

    model = AutoModelForCausalLM.from_pretrained(...)
    convert_model(model, feature_map="hedgehog", window="terrace", mode="transfer")
    params = freeze_for_transfer(model)            # feature maps + window logits, the only trainables
    ...                                            # stage 1: sum of m.transfer_loss over linearized_layers
    save_file(attention_state_dict(model), "attention.safetensors")
    set_mode(model, "student")                     # linear attention from here on

Plugins are built by name through the registry (entry points); architectures come from the table in
:mod:`.architectures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...api import PLUGIN_API_VERSION
from ...errors import ConfigError, ModelError
from .architectures import arch_spec
from .linear_attention import MODES, LinearizedAttention, check_mode, linearized_layers
from .registry import build_feature_map, build_window, check_feature_map_output

# peft wraps a model as base_model.model.<original names>; attention state dicts drop that prefix so a
# checkpoint saved before LoRA loads after it and the other way round.
PEFT_PREFIX = "base_model.model."


def _layer_indices(layers: Literal["all"] | Sequence[int], num_layers: int) -> list[int]:
    """Validated, sorted layer indices; ConfigError naming every bad entry."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        raise ConfigError(f"layers: expected 'all' or a list of layer indices, got {layers!r}",
                          hint=f"use layers='all' or e.g. layers=[0, 1] (the model has {num_layers} layers)")
    items = list(layers)
    problems: list[str] = []
    bad_type = [x for x in items if isinstance(x, bool) or not isinstance(x, int)]
    if bad_type:
        problems.append(f"layers: entries must be integers; got {bad_type!r}")
    ints = [x for x in items if isinstance(x, int) and not isinstance(x, bool)]
    out_of_range = [x for x in ints if not 0 <= x < num_layers]
    if out_of_range:
        problems.append(f"layers: {out_of_range} out of range; the model has layers 0..{num_layers - 1}")
    dupes = sorted({x for x in ints if ints.count(x) > 1})
    if dupes:
        problems.append(f"layers: {dupes} listed more than once")
    if not items:
        problems.append("layers: the list is empty; nothing would be converted")
    if problems:
        raise ConfigError(problems, hint=f"use layers='all' or distinct indices in 0..{num_layers - 1}")
    return sorted(ints)


def convert_model(
    model: nn.Module,
    *,
    feature_map: str = "hedgehog",
    feature_map_params: Mapping[str, Any] | None = None,
    window: str = "terrace",
    window_params: Mapping[str, Any] | None = None,
    layers: Literal["all"] | Sequence[int] = "all",
    mode: str = "student",
    linear_gate: bool = False,
    decay: bool = False,
    delta_rule: bool = False,
) -> nn.Module:
    """Replace the attention of ``layers`` of ``model`` by :class:`LinearizedAttention`, in place.

    ``linear_gate``: add a learnable per-head weight on the linear branch that starts near 0, so the
    untrained model is the softmax over the window and its sinks (off: the paper's method). ``decay``: a
    learnable per-head decay of the linear branch, heads starting at horizons from 64 to 4096 tokens.
    ``delta_rule``: the linear branch keeps a delta-rule state (:mod:`lolcats_cli.kernels.delta`).
    New parameters are created in fp32 on the device of each layer's projections; the base model's
    parameters and state-dict keys are untouched. Returns ``model``. Raises ModelError for an unsupported
    or already converted model, ConfigError for bad layers / mode / plugin parameters, PluginError for
    unknown plugins.
    """
    check_mode(mode)
    if linearized_layers(model):
        raise ModelError(
            f"{type(model).__name__} is already converted ({len(linearized_layers(model))} linearized layers)",
            hint="convert a freshly loaded model; to change mode use set_mode(model, mode)",
        )
    config = model.config
    spec = arch_spec(config)
    decoder_layers = spec.decoder_layers(model)
    indices = _layer_indices(layers, len(decoder_layers))
    rotary = spec.rotary()

    fm_where, win_where = "attention.feature_map_params", "attention.window_params"
    replacements: dict[int, LinearizedAttention] = {}
    for i in indices:  # build everything first: a bad parameter leaves the model untouched
        original = getattr(decoder_layers[i], spec.attention)
        heads, head_dim = config.num_attention_heads, original.head_dim
        fm_q, fm_k = (
            build_feature_map(feature_map, heads, head_dim, feature_map_params, where=fm_where, role=r, layer_idx=i)
            for r in ("q", "k")
        )
        for fm in (fm_q, fm_k):  # optional calibration from the teacher layer (plugin API v3)
            if hasattr(fm, "init_from_teacher"):
                fm.init_from_teacher(original)
        if i == indices[0]:  # once: a wrong output shape names the plugin here, not deep in a kernel
            check_feature_map_output(fm_q, feature_map)
        win = build_window(window, window_params, where=win_where)
        plugins = {
            "feature_map": feature_map,
            "feature_map_params": dataclasses.asdict(fm_q.params),
            "window": window,
            "window_params": dataclasses.asdict(win.params),
        }
        replacements[i] = LinearizedAttention(
            original,
            feature_map_q=fm_q,
            feature_map_k=fm_k,
            window=win,
            rotary=rotary,
            qk_norm=spec.qk_norm,
            sliding_window=spec.window_of(original, config),
            mode=mode,
            plugins=plugins,
            linear_gate=linear_gate,
            decay=decay,
            delta_rule=delta_rule,
        )
    for i, module in replacements.items():
        setattr(decoder_layers[i], spec.attention, module)
    return model


def _require_converted(model: nn.Module) -> list[tuple[int, LinearizedAttention]]:
    layers = linearized_layers(model)
    if not layers:
        raise ModelError(f"{type(model).__name__} has no linearized layers", hint="call convert_model(model) first")
    return layers


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put every converted layer in ``mode`` (one of teacher, student, transfer); returns ``model``."""
    check_mode(mode)
    for _, module in _require_converted(model):
        module.mode = mode
        module.transfer_loss = module.transfer_ce = None
    return model


@contextlib.contextmanager
def teacher_view(model: nn.Module, layers: Sequence[tuple[int, Any]] | None = None) -> Iterator[None]:
    """Within the block ``model`` is its own teacher: the original softmax attention in every converted layer
    (``layers``, default :func:`linearized_layers`) and any peft adapter disabled; the layers' modes and the
    adapter come back afterwards. No second copy of the weights is made."""
    layers = linearized_layers(model) if layers is None else list(layers)
    modes = [m.mode for _, m in layers]
    disable = getattr(model, "disable_adapter", None)  # peft: the original weights, without the LoRA delta
    try:
        for _, m in layers:
            m.mode = "teacher"
        with disable() if disable is not None else contextlib.nullcontext():
            yield
    finally:
        for (_, m), mode in zip(layers, modes, strict=True):
            m.mode = mode


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Feature-map weights and window logits of every converted layer, by their state-dict names in ``model``."""
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, LinearizedAttention):
            out.update({f"{prefix}.{name}": p for name, p in module.attention_parameters().items()})
    return out


def attention_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The persistent buffers of every converted layer's feature maps (a plugin's fixed random features,
    say), by their state-dict names in ``model``: they travel with the parameters (runs, checkpoints,
    exports) but never train."""
    out: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, LinearizedAttention):
            for role in ("feature_map_q", "feature_map_k"):
                fm = getattr(module, role)
                params = {n for n, _ in fm.named_parameters()}
                out.update({f"{prefix}.{role}.{n}": t for n, t in fm.state_dict(keep_vars=True).items() if n not in params})
    return out


def freeze_for_transfer(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter, then unfreeze (and return) the attention parameters only."""
    _require_converted(model)
    params = list(attention_parameters(model).values())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def _canonical(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def attention_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The new parameters and the feature maps' persistent buffers (:func:`attention_buffers`), detached, by
    state-dict name without any peft ``base_model.model.`` prefix."""
    _require_converted(model)
    tensors = {**attention_parameters(model), **attention_buffers(model)}
    return {_canonical(name): t.detach() for name, t in tensors.items()}


def load_attention_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy ``state_dict`` (from :func:`attention_state_dict`) into the converted model; strict, except that
    buffers missing from weights saved before lolcats saved buffers keep their values (with a warning).

    ModelError naming the missing, unexpected and mis-shaped keys when it does not fit exactly.
    """
    _require_converted(model)
    buffers = {_canonical(name): b for name, b in attention_buffers(model).items()}
    params = {_canonical(name): p for name, p in attention_parameters(model).items()}
    given = {_canonical(name): t for name, t in state_dict.items()}
    old = sorted(set(buffers) - set(given))
    if old:
        logging.getLogger(__name__).warning(
            f"these weights hold no value for {len(old)} feature-map buffer(s) ({', '.join(old[:3])}"
            f"{', ...' if len(old) > 3 else ''}): they keep the values the conversion gave them")
    params.update({n: b for n, b in buffers.items() if n in given})
    missing = sorted(set(params) - set(given))
    unexpected = sorted(set(given) - set(params))
    shapes = [
        f"{n}: checkpoint {tuple(given[n].shape)} vs model {tuple(params[n].shape)}"
        for n in sorted(set(params) & set(given))
        if tuple(given[n].shape) != tuple(params[n].shape)
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ModelError(
            "attention weights do not fit this converted model; " + "; ".join(problems),
            hint="convert with the feature map, window, parameters and layers the weights were trained with "
            "(see describe() saved beside them)",
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(given[name].to(device=p.device, dtype=p.dtype))


def describe(model: nn.Module) -> dict[str, Any]:
    """What the conversion was, for saving beside checkpoints: plugins, their resolved params, layers, mode."""
    layers = _require_converted(model)
    first = layers[0][1]
    if any(m.plugins != first.plugins for _, m in layers):
        raise ModelError("converted layers use different feature maps or windows; describe() expects one setting")
    return {
        **first.plugins,
        "layers": [i for i, _ in layers],
        "linear_gate": first.linear_gate,
        "decay": first.decay,
        "delta_rule": first.delta_rule,
        "mode": first.mode,
        "model_type": getattr(model.config, "model_type", None),
        "plugin_api_version": PLUGIN_API_VERSION,
    }


__all__ = [
    "MODES",
    "LinearizedAttention",
    "convert_model",
    "set_mode",
    "linearized_layers",
    "attention_parameters",
    "attention_buffers",
    "freeze_for_transfer",
    "attention_state_dict",
    "load_attention_state_dict",
    "describe",
    "teacher_view",
]
