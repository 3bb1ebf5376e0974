"""Run directories: creating them safely, recording what produced them, and opening them again.

A run directory is self-describing: ``recipe.resolved.yaml`` (every setting, defaults included),
``versions.json`` (lolcats, torch, transformers, plugins), ``attention.safetensors`` (the trained feature
maps and window factors), ``metrics.json`` and ``checkpoints/``.

A run that fails or is stopped before its first checkpoint leaves nothing in the way of a retry: it removes
what it wrote (:func:`new_run_dir`), and a folder that a killed run left without a checkpoint is reused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError, LolcatsError, PluginError, TrainingError
from ..decode.static_decode import install_static_generate
from ..model.models import check_seq_len, load_model, pick_device
from ..recipe.recipe import Recipe, load_recipe, save_resolved, write_versions
from .rundir import (
    ADAPTER_DIR,
    ATTENTION_WEIGHTS,
    METRICS,
    RESOLVED_RECIPE,
    RUN_ENTRIES,
    SOURCE,
    WRITE_TEST,
    has_checkpoint,
    has_lora,
    is_run_dir,
    require_finished_run,
)

log = logging.getLogger(__name__)


def _is_run_entry(name: str) -> bool:
    """One of :data:`RUN_ENTRIES`, or the temporary file of an atomic write of one (a killed run's)."""
    return name in RUN_ENTRIES or (name.endswith(".tmp") and any(name.startswith(f".{e}.") for e in RUN_ENTRIES))


def stopped_before_first_checkpoint(path: Path) -> bool:
    """A folder holding only what a lolcats run writes, from a run that never reached its first checkpoint
    (killed while loading the model, say): there is nothing in it to resume or to lose."""
    path = Path(path)
    if not path.is_dir() or has_checkpoint(path) or (path / METRICS).exists():
        return False
    names = [e.name for e in path.iterdir()]
    started = RESOLVED_RECIPE in names or SOURCE in names or all(n.endswith(".tmp") for n in names)
    return bool(names) and started and all(_is_run_entry(n) for n in names)


def remove_run_files(path: Path, remove_dir: bool = False) -> list[str]:
    """Remove the :data:`RUN_ENTRIES` in ``path`` (and ``path`` itself, if ``remove_dir`` and it is then
    empty); anything else stays. Returns the names removed."""
    removed = []
    for entry in sorted(Path(path).iterdir()):
        if _is_run_entry(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    if remove_dir and not any(Path(path).iterdir()):
        Path(path).rmdir()
    return removed


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> Path:
    """Make ``path`` ready for a run; never silently reuse or destroy a user's folder. A folder left by a run
    that stopped before its first checkpoint is reused (with a warning): it holds nothing to lose."""
    path = Path(path)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other", "pass only one of them")
    if resume:
        if not is_run_dir(path):
            raise LolcatsError(
                f"cannot resume: {path} is not a lolcats run directory (no {RESOLVED_RECIPE})",
                "check the path, or start a new run without --resume",
            )
        return path
    if not overwrite and stopped_before_first_checkpoint(path):
        remove_run_files(path)
        log.warning(f"reusing {path}: the run there stopped before its first checkpoint, so it held nothing to resume")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise LolcatsError(
                f"output directory {path} already exists and is not empty",
                "pass --resume to continue that run, --overwrite to replace it, or choose another --output",
            )
        if not is_run_dir(path):
            raise LolcatsError(
                f"refusing to overwrite {path}: it is not a lolcats run directory",
                "choose another --output; lolcats only replaces folders it created",
            )
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / WRITE_TEST
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LolcatsError(f"cannot write to output directory {path}: {e.strerror}", "choose a writable --output") from e
    return path


@contextlib.contextmanager
def new_run_dir(path: Path, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """:func:`prepare_run_dir`, and if the body fails (or is interrupted) before the run's first checkpoint,
    remove what the run wrote, and the folder itself if the run made it, with a warning that says so: the
    same command can then simply be run again. A resumed run's folder is always left as it is.
    A full disk becomes a TrainingError that names the folder and says whether a checkpoint is kept."""
    path = Path(path)
    made = not path.exists() or (overwrite and is_run_dir(path))
    path = prepare_run_dir(path, resume=resume, overwrite=overwrite)
    try:
        yield path
    except BaseException as err:
        kept = has_checkpoint(path)
        if not resume and path.is_dir() and not kept:
            try:
                removed = remove_run_files(path, remove_dir=made)
            except OSError as e:  # never hide the error that stopped the run
                log.warning(f"could not clean up {path} after the failed run: {e}")
            else:
                what = path if not path.exists() else f"{', '.join(removed)} from {path}" if removed else None
                if what:
                    log.warning(f"removed {what}: the run stopped before its first checkpoint, so there was "
                                "nothing to resume; run the same command again to retry")
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrainingError(
                f"the disk is full: cannot write in {path}",
                f"the last good checkpoint is kept in {path / 'checkpoints'}; free some space on that disk and run "
                "again with --resume" if kept else "free some space on that disk and run the same command again",
            ) from err
        raise


def plugin_versions(recipe: Recipe) -> list[dict[str, Any]]:
    """The distributions and versions of the plugins a recipe uses."""
    from ..model.registry import list_plugins

    wanted = {("feature_map", recipe.attention.feature_map), ("window", recipe.attention.window)}
    return [
        {"kind": p.kind, "name": p.name, "distribution": p.distribution, "version": p.version}
        for p in list_plugins()
        if (p.kind, p.name) in wanted
    ]


def record_run(run_dir: Path, recipe: Recipe) -> None:
    """Write the resolved recipe and the versions of everything that produced the run."""
    save_resolved(recipe, run_dir)
    write_versions(run_dir, plugin_versions(recipe))


def check_plugins(recipe: Recipe) -> None:
    """Resolve the recipe's feature map and window and validate their parameters; every problem at once."""
    from ..model.registry import build_params, get_feature_map, get_window

    att, errors = recipe.attention, []
    for getter, name, params, where in (
        (get_feature_map, att.feature_map, att.feature_map_params, "attention.feature_map_params"),
        (get_window, att.window, att.window_params, "attention.window_params"),
    ):
        try:
            build_params(getter(name), params, where)
        except ConfigError as e:
            errors.extend(e.errors)
        except PluginError as e:
            errors.append(str(e))
    if att.kernel is not None:
        from ...kernels.registry import get_kernel

        try:
            get_kernel(att.kernel)
        except ConfigError as e:
            errors.extend(f"attention.kernel: {m}" for m in e.errors)
    if errors:
        raise ConfigError(errors, "fix the recipe or pass overrides such as attention.window_params.size=64")


def check_window_fits(recipe: Recipe) -> None:
    """ConfigError when no training sequence has a key outside the softmax window: with ``data.seq_len`` at
    most the window's reach, the linear branch sees nothing and attention transfer would train nothing."""
    import torch

    from ..model.registry import build_window

    att, seq_len = recipe.attention, recipe.data.seq_len
    window = build_window(att.window, att.window_params, where="attention.window_params")
    last = seq_len - 1
    if int(window.start(torch.tensor(last))) > window.sinks:
        return
    raise ConfigError(
        f"data.seq_len={seq_len}: the {att.window} window ({att.window_params}) covers every key of a "
        f"{seq_len}-token sequence, so the linear branch never sees a key and attention transfer would train nothing",
        hint=f"raise data.seq_len well above the window's reach of {window.span} keys (4x or more, e.g. "
        f"data.seq_len={max(4 * window.span, 512)}) or shrink attention.window_params.size",
    )


def load_converted_model(recipe: Recipe, device: torch.device, mode: str = "student",
                         softmax_layers: Sequence[int] = ()):
    """Load the recipe's base model and swap its attentions; returns ``(model, tokenizer, source_info)``.

    ``softmax_layers``: layers left unconverted although ``attention.layers`` names them (the resolved
    ``attention.softmax_layers`` of a finished transfer run)."""
    from ..model.convert import convert_model
    from ..model.softmax_layers import without

    check_plugins(recipe)  # fail before the (slow) model load
    model, tokenizer, source = load_model(recipe.model, device=device)
    check_seq_len(model, recipe.data.seq_len)
    att = recipe.attention
    layers = att.layers
    if softmax_layers:
        every = list(range(model.config.num_hidden_layers)) if layers == "all" else list(layers)
        layers = without(every, softmax_layers)
    convert_model(
        model,
        feature_map=att.feature_map,
        feature_map_params=att.feature_map_params,
        window=att.window,
        window_params=att.window_params,
        layers=layers,
        mode=mode,
        linear_gate=att.linear_gate,
        decay=att.decay,
        delta_rule=att.delta_rule,
    )
    if att.kernel is not None:  # one kernel for every converted layer (None: chosen per device)
        from ..model.linear_attention import linearized_layers

        for _, layer in linearized_layers(model):
            layer.kernel = att.kernel
    return model, tokenizer, source


def open_run(run_dir: Path, device: torch.device | None = None, mode: str = "student", merge_lora: bool = True):
    """Rebuild a finished run: ``(recipe, model, tokenizer)`` with its trained attentions loaded and, for a
    finetune run, its LoRA adapter applied (merged into the weights unless ``merge_lora`` is False)."""
    from ..model.convert import load_attention_state_dict
    from ..model.softmax_layers import drop_layers, resolve_softmax_layers
    from ..train.checkpoint import load_tensors

    run_dir = Path(run_dir)
    require_finished_run(run_dir)
    recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    device = pick_device(device)
    softmax = resolve_softmax_layers(recipe.attention.softmax_layers, run_dir)
    model, tokenizer, _ = load_converted_model(recipe, device, mode=mode, softmax_layers=softmax)
    load_attention_state_dict(model, drop_layers(load_tensors(run_dir / ATTENTION_WEIGHTS, device), softmax))
    if has_lora(run_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run_dir / ADAPTER_DIR)
        if merge_lora:
            model = model.merge_and_unload()
    model.eval()
    return recipe, install_static_generate(model), tokenizer


__all__ = [
    "pick_device",
    "prepare_run_dir",
    "new_run_dir",
    "record_run",
    "load_converted_model",
    "open_run",
    "plugin_versions",
]
