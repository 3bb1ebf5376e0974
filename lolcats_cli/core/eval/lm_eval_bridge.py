"""lm-evaluation-harness on lolcats models: task lookup with clear errors, and runs through ``HFLM``.

lm-eval's ``HFLM`` accepts an already-built model and ``simple_evaluate`` accepts an ``LM`` instance
(STYLE.md), so a converted model is evaluated in whatever attention mode it is in: the caller sets the mode,
this module only wraps and runs. Tasks are checked before any model work: an unknown name fails in seconds
with lm-eval's own suggestion (when it makes one), ours, and where the task list comes from.

Building lm-eval's full task index reads every YAML file it ships (about 20 s); when every requested name
is found under ``--include-path`` alone, that index is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError, DataError, LolcatsError, did_you_mean

INSTALL = "pip install 'lolcats[eval]'"
_GLOB = set("*?[")
_NOT_METRICS = {"sample_len", "samples"}


def require_lm_eval() -> Any:
    """The ``lm_eval`` module; LolcatsError with the pip command when it is not installed."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as e:
        raise LolcatsError(
            f"--tasks needs lm-evaluation-harness, which is not installed ({e})", f"install it: {INSTALL}"
        ) from e
    return lm_eval


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool = True) -> Any:
    """An lm-eval ``TaskManager`` (cached: its index takes seconds to build)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Validated task names and the ``TaskManager`` that knows them."""

    names: tuple[str, ...]
    manager: Any


def _expand(manager: Any, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(known, unknown)``: registered names, glob patterns expanded, and YAML file paths are known."""
    known, unknown = [], []
    for name in names:
        if name in manager.all_tasks or (name.endswith(".yaml") and Path(name).is_file()):
            known.append(name)
        elif _GLOB & set(name) and (matched := manager.match_tasks([name])):
            known.extend(matched)
        else:
            unknown.append(name)
    return known, unknown


def _lm_eval_suggestion(manager: Any, name: str) -> str:
    """lm-eval's own message for ``name`` when it contains a suggestion, else ''."""
    try:
        manager.load([name])
    except Exception as e:  # lm-eval raises KeyError / ValueError with its own wording
        text = str(e).strip("'\" ")
        return f"lm-eval: {text}; " if "did you mean" in text.lower() else ""
    return ""


def _unknown_error(manager: Any, unknown: list[str], include_path: str | None) -> ConfigError:
    problems = [
        f"--tasks: lm-eval has no task, group or tag {name!r}; "
        f"{_lm_eval_suggestion(manager, name)}{did_you_mean(name, manager.all_tasks)}".rstrip("; ")
        for name in unknown
    ]
    where = f"lm-eval's {len(manager.all_tasks)} names" + (f" and {include_path}" if include_path else "")
    return ConfigError(
        problems,
        f"searched {where}; list them with `lm-eval ls tasks`, or pass --include-path DIR holding your task YAML",
    )


def resolve_tasks(names: Sequence[str], include_path: str | Path | None = None) -> TaskSet:
    """Check every name in ``names`` (and load the tasks once, so missing datasets fail now, not later).

    ConfigError for unknown names or a missing include path; DataError when a task's data cannot be loaded;
    LolcatsError with the pip command when lm-eval is not installed.
    """
    require_lm_eval()
    include = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path: {include_path} is not a folder", "pass the folder holding your task YAML files")
        include = str(Path(include_path).resolve())
    if not names:
        raise ConfigError("--tasks: no task names given", "e.g. --tasks piqa,arc_easy")
    if include is not None:  # fast path: every name is a local task
        local = task_manager(include, False)
        known, unknown = _expand(local, names)
        if not unknown:
            try:
                return _loaded(local, known)
            except DataError:
                pass  # e.g. a local group of built-in tasks: retry with the full index
    manager = task_manager(include, True)
    known, unknown = _expand(manager, names)
    if unknown:
        raise _unknown_error(manager, unknown, include)
    return _loaded(manager, known)


def _loaded(manager: Any, names: list[str]) -> TaskSet:
    try:
        manager.load(list(names))
    except Exception as e:  # a dataset that cannot be read (offline, say) or a broken task YAML
        raise DataError(
            f"lm-eval could not load task(s) {', '.join(names)}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
            "check the network (or HF_DATASETS_OFFLINE with a filled cache) and the task's YAML; "
            "with --include-path, dataset paths in the YAML are relative to where lolcats runs",
        ) from e
    return TaskSet(tuple(dict.fromkeys(names)), manager)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results``: numeric metrics only (not ``sample_len``), the
    filter suffix dropped (``"acc,none"`` -> ``"acc"``, ``"acc_stderr,none"`` -> ``"acc_stderr"``)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        out[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key.split(",")[0] not in _NOT_METRICS
        }
    return out


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: TaskSet,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 0,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` (a HF causal LM, in the attention mode the caller set) on ``tasks``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm, tasks=list(tasks.names), num_fewshot=num_fewshot, limit=limit, task_manager=tasks.manager,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )  # fmt: skip
    return summarize((output or {}).get("results", {}))


__all__ = ["INSTALL", "TaskSet", "require_lm_eval", "resolve_tasks", "run_tasks", "summarize", "task_manager"]
