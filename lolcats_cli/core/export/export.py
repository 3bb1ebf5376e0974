"""Export a finished run (``lolcats transfer`` or ``lolcats finetune``) for use outside lolcats' run folders.

Two formats:

* ``adapter`` (a few MB): ``lolcats_config.json`` (attention settings, plugins with their distributions
  and versions, the base model and its architecture, versions), ``attention.safetensors`` and, for a
  finetune run, the peft ``adapter/``. :func:`load_adapter_export` rebuilds the model from the base model
  and these files (lolcats and the plugins must be installed).
* ``hf``: a self-contained Hugging Face model folder (see :mod:`.export_hf`) that loads with
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` where lolcats is not installed; its
  ``generate()`` takes the bundled static decode loop as the models of :func:`load_adapter_export` do.

Nothing here reads or writes a pickle: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ... import __version__
from ...errors import ConfigError, LolcatsError, ModelError
from ..decode.static_decode import install_static_generate
from ..runs.rundir import (
    ADAPTER_DIR,
    ATTENTION_WEIGHTS,
    PEFT_FILES,
    RESOLVED_RECIPE,
    VERSIONS,
    has_lora,
    require_finished_run,
)

if TYPE_CHECKING:
    from torch import nn

FORMATS: tuple[str, ...] = ("adapter", "hf")
ADAPTER_CONFIG = "lolcats_config.json"
ADAPTER_FORMAT = "lolcats-adapter"
ADAPTER_FORMAT_VERSION = 1
# The config fields that must match for attention weights and LoRA trained on one model to fit another.
ARCH_FIELDS: tuple[str, ...] = (
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size",
)


def export_run(
    run_dir: Path | str, out_dir: Path | str, fmt: Literal["adapter", "hf"], overwrite: bool = False,
    *, dtype: str = "auto",
) -> Path:
    """Export ``run_dir`` to ``out_dir`` in format ``fmt``; returns ``out_dir``.

    ``dtype`` (hf only): the weights' dtype, ``auto`` = the base checkpoint's own. The folder is written
    next to ``out_dir`` under a temporary name and renamed at the end, so a failed export leaves nothing
    half-written. An existing non-empty ``out_dir`` is replaced only with ``overwrite``, and only when it
    is a lolcats export. Raises ConfigError for a bad format or dtype, LolcatsError for a bad folder.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not an export format; choose one of: {', '.join(FORMATS)}",
                          hint="adapter = a few MB on top of the base model; hf = a self-contained Hugging Face folder")
    if fmt == "adapter" and dtype != "auto":
        raise ConfigError(f"--dtype {dtype} applies to --format hf only (an adapter keeps the trained fp32 weights)",
                          hint="drop --dtype, or export with --format hf")
    if fmt == "hf":
        from .export_hf import export_dtype

        export_dtype(dtype, None)  # a bad name fails before any model is loaded
    run_dir, out = Path(run_dir), Path(out_dir)
    require_finished_run(run_dir)
    _check_out(out, run_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "adapter":
            write_adapter_export(run_dir, tmp)
        else:
            from .export_hf import write_hf_export

            write_hf_export(run_dir, tmp, dtype)
        _check_no_pickle(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_export(path: Path) -> bool:
    """True for a folder this module wrote (an adapter or an hf export)."""
    if (path / ADAPTER_CONFIG).is_file():
        return True
    try:
        return "lolcats" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    here, run = out.resolve(), run_dir.resolve()
    if here == run or here in run.parents:
        raise LolcatsError(f"--out {out} would replace the run directory {run_dir} it exports",
                           "choose an --out folder outside the run directory, e.g. exports/<name>")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise LolcatsError(f"export folder {out} already exists and is not empty",
                           "pass --overwrite to replace it, or choose another --out")
    if not out.is_dir() or not _is_export(out):
        raise LolcatsError(f"refusing to overwrite {out}: it is not a lolcats export",
                           "choose another --out; lolcats only replaces folders it exported")


def _check_no_pickle(folder: Path) -> None:
    pickles = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:  # a library changed its defaults under us: never ship pickles
        raise LolcatsError(f"the export wrote pickle files ({', '.join(pickles)}); refusing to keep them",
                           "report this as a lolcats bug with `lolcats plugins` and your library versions")


# ------------------------------------------------------------------------------------------- adapter


def architecture(config: Any) -> dict[str, Any]:
    """The fields of :data:`ARCH_FIELDS` (plus vocab_size, for information) of a transformers config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    out = {name: getattr(config, name, None) for name in ARCH_FIELDS}
    out["num_key_value_heads"] = out["num_key_value_heads"] or heads
    out["head_dim"] = out["head_dim"] or (hidden // heads if hidden and heads else None)
    out["vocab_size"] = getattr(config, "vocab_size", None)
    return out


def _describe_arch(arch: dict[str, Any]) -> str:
    return (f"{arch.get('model_type')}: {arch.get('num_hidden_layers')} layers, hidden {arch.get('hidden_size')}, "
            f"{arch.get('num_attention_heads')} heads / {arch.get('num_key_value_heads')} KV heads of "
            f"{arch.get('head_dim')}, MLP {arch.get('intermediate_size')}")


def write_adapter_export(run_dir: Path, out: Path) -> None:
    """Write ``lolcats_config.json``, ``attention.safetensors`` and the peft ``adapter/`` (if any) into ``out``."""
    import dataclasses

    from ..model.models import read_base_config
    from ..model.registry import build_params, get_feature_map, get_window
    from ..model.softmax_layers import drop_layers, resolve_softmax_layers, without
    from ..recipe.recipe import load_recipe, versions
    from ..runs.workspace import plugin_versions
    from ..train.checkpoint import load_json, load_tensors, save_json, save_tensors

    recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    att, model = recipe.attention, recipe.model
    config = read_base_config(model)
    arch = architecture(config)
    fm_params = build_params(get_feature_map(att.feature_map), att.feature_map_params, "attention.feature_map_params")
    win_params = build_params(get_window(att.window), att.window_params, "attention.window_params")
    layers = list(range(arch["num_hidden_layers"])) if att.layers == "all" else sorted(att.layers)
    softmax = resolve_softmax_layers(att.softmax_layers, run_dir)  # kept as softmax: not converted on load
    layers = without(layers, softmax)

    if softmax:
        save_tensors(out / ATTENTION_WEIGHTS, drop_layers(load_tensors(run_dir / ATTENTION_WEIGHTS, "cpu"), softmax))
    else:
        shutil.copyfile(run_dir / ATTENTION_WEIGHTS, out / ATTENTION_WEIGHTS)
    has_adapter = has_lora(run_dir)
    if has_adapter:
        missing = [n for n in PEFT_FILES if not (run_dir / ADAPTER_DIR / n).is_file()]
        if missing:
            raise LolcatsError(
                f"{run_dir / ADAPTER_DIR} has no {', '.join(missing)} (only safetensors adapters are exported)",
                "re-run `lolcats finetune`: it saves adapter_model.safetensors",
            )
        (out / ADAPTER_DIR).mkdir()
        for name in PEFT_FILES:
            shutil.copyfile(run_dir / ADAPTER_DIR / name, out / ADAPTER_DIR / name)
    run_versions = load_json(run_dir / VERSIONS) if (run_dir / VERSIONS).is_file() else None
    save_json(out / ADAPTER_CONFIG, {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lolcats_version": __version__,
        "attention": {
            "feature_map": att.feature_map, "feature_map_params": dataclasses.asdict(fm_params),
            "window": att.window, "window_params": dataclasses.asdict(win_params), "layers": layers,
            "linear_gate": att.linear_gate, "decay": att.decay, "delta_rule": att.delta_rule,
        },
        "plugins": plugin_versions(recipe),
        "base_model": {
            "name": model.name, "revision": model.revision, "gguf_file": model.gguf_file,
            "commit": getattr(config, "_commit_hash", None), "dtype": model.dtype,
            "trust_remote_code": model.trust_remote_code, "architecture": arch,
        },
        "lora": has_adapter,
        "versions": {k: v for k, v in versions().items() if k != "plugins"},  # of this export
        "run_versions": run_versions,  # of the run it exports (versions.json)
    })


def read_adapter_config(export_dir: Path | str) -> dict[str, Any]:
    """The validated ``lolcats_config.json`` of an adapter export; LolcatsError naming the problem otherwise."""
    path = Path(export_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LolcatsError(f"{export_dir} is not a lolcats adapter export (no {ADAPTER_CONFIG})",
                           "pass a folder written by `lolcats export RUN --format adapter`")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise LolcatsError(f"{path} is not valid JSON: {e}", "export the run again") from e
    if data.get("format") != ADAPTER_FORMAT:
        raise LolcatsError(f"{path}: format {data.get('format')!r} is not {ADAPTER_FORMAT!r}",
                           "pass a folder written by `lolcats export RUN --format adapter`")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > ADAPTER_FORMAT_VERSION:
        raise LolcatsError(
            f"{path}: adapter format version {data.get('format_version')!r} is newer than this lolcats reads "
            f"(v{ADAPTER_FORMAT_VERSION})",
            f"upgrade lolcats (the export was written by lolcats {data.get('lolcats_version')})",
        )
    return data


def check_architecture(expected: dict[str, Any], config: Any, adapter_label: str, base_label: str) -> None:
    """ModelError naming both models and every differing field unless ``config`` fits ``expected``."""
    got = architecture(config)
    diffs = [f"{k} {expected.get(k)!r} vs {got[k]!r}" for k in ARCH_FIELDS if expected.get(k) != got[k]]
    if diffs:
        raise ModelError(
            f"the adapter {adapter_label} was trained on a different model than {base_label!r}: adapter base is "
            f"{_describe_arch(expected)}; {base_label!r} is {_describe_arch(got)} (differs in: {'; '.join(diffs)})",
            hint=f"pass base_model= the model the adapter was trained on ({expected.get('model_type')} with "
            f"{expected.get('num_hidden_layers')} layers), or run `lolcats transfer` on {base_label!r}",
        )


def load_adapter_export(
    export_dir: Path | str, base_model: str | os.PathLike[str] | nn.Module | None = None, device: Any = None,
    merge_lora: bool = True,
) -> nn.Module:
    """Rebuild the linearized model of an adapter export on top of its base model; returns the model (eval).

    ``base_model``: None (the model the run used, from ``lolcats_config.json``), a hub id / folder / .gguf
    path, or an already loaded transformers causal LM (converted in place). The base model's architecture
    is checked before its weights are loaded: a mismatch raises ModelError naming both models.
    LoRA is merged into the weights unless ``merge_lora`` is False.
    """
    from ..model.convert import convert_model, load_attention_state_dict
    from ..model.models import load_model, read_base_config
    from ..recipe.recipe import ModelConfig
    from ..train.checkpoint import load_tensors

    export_dir = Path(export_dir)
    cfg = read_adapter_config(export_dir)
    base, att = cfg["base_model"], cfg["attention"]
    expected = base["architecture"]
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        same = base_model is None
        name = base["name"] if same else str(base_model)
        model_cfg = ModelConfig(
            name=name,
            revision=base.get("revision") if same else None,
            gguf_file=base.get("gguf_file") if same else None,
            dtype=base.get("dtype", "auto"), trust_remote_code=bool(base.get("trust_remote_code", False)),
        )
        check_architecture(expected, read_base_config(model_cfg), str(export_dir), name)
        model, _, _ = load_model(model_cfg, device)
    else:
        model = base_model
        label = getattr(model.config, "_name_or_path", "") or type(model).__name__
        check_architecture(expected, model.config, str(export_dir), label)
    convert_model(
        model, feature_map=att["feature_map"], feature_map_params=att["feature_map_params"],
        window=att["window"], window_params=att["window_params"], layers=att["layers"], mode="student",
        linear_gate=bool(att.get("linear_gate", False)), decay=bool(att.get("decay", False)),
        delta_rule=bool(att.get("delta_rule", False)),
    )
    weights_device = next(model.parameters()).device
    load_attention_state_dict(model, load_tensors(export_dir / ATTENTION_WEIGHTS, weights_device))
    if cfg.get("lora"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, export_dir / ADAPTER_DIR)
        if merge_lora:
            model = model.merge_and_unload()
    model.eval()
    return install_static_generate(model)


def list_files(folder: Path | str) -> list[tuple[str, int]]:
    """``(relative path, bytes)`` of every file under ``folder``, sorted."""
    folder = Path(folder)
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


__all__ = [
    "ADAPTER_CONFIG",
    "FORMATS",
    "architecture",
    "check_architecture",
    "export_run",
    "list_files",
    "load_adapter_export",
    "read_adapter_config",
    "write_adapter_export",
]
