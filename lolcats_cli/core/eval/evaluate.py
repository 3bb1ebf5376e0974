"""Evaluate a linearized run (or any model) side by side with its softmax teacher and two baselines.

Rows (docs/method.md section 5 lists the weaknesses they expose):

* ``teacher``: the original softmax model (the converted model in teacher mode, LoRA adapters off);
* ``sink_window``: training-free softmax over the last 64 keys plus the first 4 "sink" tokens (teacher mode
  with a 4-D mask built per length; a strong short-context baseline);
* ``linearized``: the hybrid model (student mode, LoRA on for a finetune run);
* ``linear_zeroed``: student mode with phi_q forced to zero, so only the softmax window carries (how much
  the hybrid leans on its window);
* ``linearized_recall`` (only when asked for): the hybrid model with a recall cache of the keys its linear
  state recalls worst, kept exactly (:mod:`lolcats_cli.kernels.recall`; ``recall_slots`` keys per KV head).

Metrics per row: perplexity at each context length over non-overlapping windows, and on the positions past
1024 alone (where only long-range context helps); per-layer attention MSE against the teacher (linearized
rows, from transfer mode); passkey retrieval accuracy (``core/eval/passkey.py``); lm-eval-harness tasks
(``core/eval/lm_eval_bridge.py``). An unconverted model (``model_id``) gets the teacher and sink rows only.

    report = evaluate_run("runs/smollm2-135m", contexts=(512, 2048), tasks=["piqa"], limit=100)
    report.rows["linearized"].perplexity[2048]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, DataError, did_you_mean
from ..progress import NullReporter, Reporter, StepInfo
from ..runs.rundir import FINISHED_HINT, require_finished_run
from .eval_rows import (
    DEFAULT_ROWS,
    ROWS,
    SINK_TOKENS,
    SINK_WINDOW,
    SOFTMAX_ROWS,
    as_row,
    recall_kernel,
    sink_attention,
    sink_mask,
    softmax_layers_of,
    zero_linear_branch,
)

LONG_RANGE_FROM = 1024  # "past 1024": targets at positions >= 1024
DEFAULT_MAX_TOKENS = 32_768  # per context length: enough for a stable perplexity, minutes on a CPU


# ------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class RowResult:
    """One row of the comparison. Dict keys are context lengths, passkey lengths, layers, task names."""

    name: str
    perplexity: dict[int, float] = dataclasses.field(default_factory=dict)
    perplexity_past_1024: dict[int, float] = dataclasses.field(default_factory=dict)  # contexts > 1024 only
    attention_mse: dict[int, float] | None = None  # per layer; linearized rows only
    passkey: dict[int, float] = dataclasses.field(default_factory=dict)  # accuracy in [0, 1]
    lm_eval: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalReport:
    """Everything ``lolcats eval`` shows; :meth:`to_dict` is its ``--json`` form (keys as strings)."""

    source: str  # the run directory or the model id
    kind: str  # "run" or "model"
    text: str  # where the perplexity text came from
    text_tokens: int
    contexts: list[int]
    passkey_lengths: list[int]
    passkey_n: int
    seed: int
    tasks: list[str]
    mse_context: int | None  # the context length the attention MSE was measured at
    rows: dict[str, RowResult]
    max_tokens: int | None = None  # the cap on perplexity tokens per context length (None = all)
    wall_time_s: float = 0.0
    softmax_layers: list[int] = dataclasses.field(default_factory=list)  # kept as softmax (attention.softmax_layers)

    def to_dict(self) -> dict[str, Any]:
        def keys_to_str(value: Any) -> Any:
            if isinstance(value, dict):
                return {str(k): keys_to_str(v) for k, v in value.items()}
            return value

        out = dataclasses.asdict(self)
        out["rows"] = {name: keys_to_str(dataclasses.asdict(row)) for name, row in self.rows.items()}
        return out


# ------------------------------------------------------------------------------------ text and losses


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None,
              device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Per-token next-token NLL in nats: ``(nll, mask)``, both ``(B, T - 1)`` on the CPU.

    ``nll[b, t] = -log p(target[b, t + 1] | tokens <= t)`` with ``target = labels`` (or ``input_ids``);
    ``mask`` is False (and ``nll`` 0) where the target is -100.
    """
    from ..train.precision import autocast_for

    device = device or input_ids.device
    ids = input_ids.to(device)
    with autocast_for(device):
        logits = model(input_ids=ids, use_cache=False).logits
    target = (ids if labels is None else labels.to(device))[:, 1:]
    mask = target != -100
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none"
    )  # (B, T - 1)
    return (nll * mask).cpu(), mask.cpu()


def mean_token_nll(model: nn.Module, input_ids: Tensor, labels: Tensor | None, device: torch.device) -> float:
    """Mean next-token NLL per predicted token over ``input_ids`` ``(N, T)``, one sequence at a time
    (finetune uses it as its held-out loss)."""
    total, count = 0.0, 0
    for row in range(input_ids.shape[0]):
        lab = None if labels is None else labels[row : row + 1]
        nll, mask = token_nll(model, input_ids[row : row + 1], lab, device)
        total, count = total + nll.sum().item(), count + int(mask.sum())
    return total / max(count, 1)


def windows(stream: Tensor, context: int, max_tokens: int | None, what: str) -> Tensor:
    """Non-overlapping windows ``(n, context)`` of the 1-D token ``stream`` (at most ``max_tokens`` tokens
    in all, at least one window); DataError when the stream is shorter than ``context``."""
    n = stream.numel() // context
    if n == 0:
        raise DataError(
            f"the evaluation text ({what}) has {stream.numel()} tokens, fewer than the context length {context}",
            f"pass a longer --text FILE, or lower --contexts to at most {stream.numel()}",
        )
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // context))
    return stream[: n * context].view(n, context)


def perplexities(model: nn.Module, batches: dict[int, Tensor], device: torch.device) -> tuple[dict[int, float], dict[int, float]]:
    """``(ppl per context, ppl past 1024 per context > 1024)`` over the windows ``batches[context]``."""
    ppl, past = {}, {}
    for context, ids in batches.items():
        total = long_total = 0.0
        for row in range(ids.shape[0]):
            nll, _ = token_nll(model, ids[row : row + 1], device=device)
            total += nll.sum().item()
            long_total += nll[:, LONG_RANGE_FROM - 1 :].sum().item()
        ppl[context] = math.exp(total / (ids.shape[0] * (context - 1)))
        if context > LONG_RANGE_FROM:
            past[context] = math.exp(long_total / (ids.shape[0] * (context - LONG_RANGE_FROM)))
    return ppl, past


def attention_mse(model: nn.Module, ids: Tensor, device: torch.device) -> dict[int, float]:
    """Per-layer MSE of the (current variant of the) student's head outputs against the teacher's, on
    ``ids`` ``(N, T)`` with exact teacher inputs at every layer (transfer mode, docs/method.md section 3)."""
    from ..model.convert import set_mode
    from ..model.linear_attention import linearized_layers
    from ..train.transfer import TransferObjective

    before = linearized_layers(model)[0][1].mode
    set_mode(model, "transfer")
    try:
        _, details = TransferObjective(model, ids, device, mse_weight=1.0).evaluate()
    finally:
        set_mode(model, before)
    return {row["layer"]: row["mse"] for row in details["layers"]}


def load_tokens(tokenizer: Any, *, text_file: str | Path | None, dataset: str | None, data_cfg: Any,
                whole: bool) -> tuple[Tensor, str]:
    """The evaluation token stream ``(N,)`` and a description of where it came from.

    ``text_file``: that file, tokenized as one document. Otherwise ``data_cfg`` (a DataConfig; ``dataset``
    replaces its dataset): the held-out split of ``data.build_datasets``, or with ``whole`` (a model lolcats
    did not train, so none of the text was seen in training) every example, tokenized as ``data`` does.
    """
    if text_file is not None:
        path = Path(text_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--text: cannot read {path}: {e}", "pass a UTF-8 text file") from e
        if not text.strip():
            raise DataError(f"--text: {path} is empty", "pass a file with the text to measure perplexity on")
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long), str(path)
    from ..data.data import build_datasets, load_texts, tokenize

    if dataset is not None:
        data_cfg = dataclasses.replace(data_cfg, dataset=dataset)
    if whole:
        ids, _ = tokenize(load_texts(data_cfg, tokenizer), tokenizer)
        return torch.from_numpy(ids).long(), f"{data_cfg.dataset}, all of it"
    _, heldout = build_datasets(data_cfg, tokenizer)
    what = f"{data_cfg.dataset}, the run's held-out split (data.holdout={data_cfg.holdout})"
    return heldout.input_ids.reshape(-1).long(), what


# --------------------------------------------------------------------------------------------- driver


def _lengths(values: Sequence[int], flag: str, limit: int | None) -> list[int]:
    out = [int(v) for v in values]
    bad = [v for v in out if v < 2]
    if bad:
        raise ConfigError(f"{flag}: lengths must be at least 2 tokens; got {bad}", f"e.g. {flag} 512,2048")
    if limit is not None and any(v > limit for v in out):
        raise ConfigError(
            f"{flag}: {[v for v in out if v > limit]} exceed the model's {limit} positions (max_position_embeddings)",
            f"use {flag} values up to {limit}",
        )
    return list(dict.fromkeys(out))


# Above this many tokens (rows x perplexity tokens + passkey prompts) a CPU evaluation takes many minutes.
CPU_HEAVY_TOKENS = 150_000
CPU_TOKENS_PER_S = 350  # SmolLM2-135M forward on a 2-core CPU, fp32: a small model's rate, so a lower bound


def cpu_load_warning(rows: Sequence[str], batches: dict[int, Tensor], prompts: dict[int, list[Any]]) -> str | None:
    """A message with the tokens an evaluation will read and a lighter command, when it is heavy for a CPU."""
    per_row = sum(int(b.numel()) for b in batches.values())
    per_row += sum(len(p.prompt_ids) for ps in prompts.values() for p in ps)
    total = per_row * len(rows)
    if total <= CPU_HEAVY_TOKENS:
        return None
    minutes = total / CPU_TOKENS_PER_S / 60
    return (f"this evaluation reads {total:,} tokens on the CPU ({len(rows)} rows x {per_row:,}): at least "
            f"{minutes:.0f} min even for a 135M model; for a quicker look use --max-tokens 8192 --passkey-n 5 "
            "(or --contexts 512 --passkey none)")


def _pick_rows(rows: Sequence[str] | None, converted: bool) -> list[str]:
    if rows is None:
        return list(DEFAULT_ROWS if converted else SOFTMAX_ROWS)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ConfigError([f"rows: unknown row {r!r}; {did_you_mean(r, ROWS)}valid: {', '.join(ROWS)}" for r in bad])
    if not converted and (lin := [r for r in rows if r not in SOFTMAX_ROWS]):
        raise ConfigError(f"rows: {lin} need a linearized run; a plain --model has only {', '.join(SOFTMAX_ROWS)}",
                          "pass a run directory instead of --model")
    return list(dict.fromkeys(rows))


def _check_arguments(run_dir: str | Path | None, model_id: str | None, text_file: str | Path | None,
                     dataset: str | None, passkey_lengths: Sequence[int], passkey_n: int, max_tokens: int | None,
                     sink_window: int, sink_tokens: int) -> bool:
    """Every check that needs no model, all problems at once; returns whether ``run_dir`` is the source."""
    if (run_dir is None) == (model_id is None):
        raise ConfigError("pass either a run directory or --model ID|PATH (exactly one of them)",
                          "e.g. `lolcats eval runs/smollm2-135m` or `lolcats eval --model smollm2-135m`")
    problems = []
    if text_file is not None and dataset is not None:
        problems.append(f"--text {text_file} and --dataset {dataset}: pass one of them")
    if passkey_lengths and passkey_n < 1:
        problems.append(f"--passkey-n: must be at least 1 (got {passkey_n}); e.g. --passkey-n 20")
    if max_tokens is not None and max_tokens < 1:
        problems.append(f"--max-tokens: must be at least 1 (got {max_tokens}); None (--max-tokens 0) uses all the text")
    if sink_window < 1 or sink_tokens < 0:
        problems.append(f"sink window {sink_window} / sink tokens {sink_tokens}: need a window >= 1 and sinks >= 0")
    if problems:
        raise ConfigError(problems)
    if run_dir is not None:
        require_finished_run(run_dir, f"{FINISHED_HINT}, or evaluate a plain model with --model ID|PATH")
    return run_dir is not None


def _load(run_dir: str | Path | None, model_id: str | None, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """``(hf_model, peft_model or None, tokenizer, data_cfg)``, converted, in eval mode on ``device``."""
    from ..recipe.recipe import DataConfig, ModelConfig

    if run_dir is not None:
        from ..runs.workspace import open_run

        recipe, model, tokenizer = open_run(Path(run_dir), device, mode="teacher", merge_lora=False)
        peft_model = model if hasattr(model, "disable_adapter") else None
        hf_model = model.get_base_model() if peft_model is not None else model
        return hf_model, peft_model, tokenizer, recipe.data
    from ..model.convert import convert_model
    from ..model.models import load_model

    model, tokenizer, _ = load_model(ModelConfig(name=model_id), device=device)
    convert_model(model, mode="teacher")  # teacher mode reproduces the model; it gives the sink row its mask
    return model, None, tokenizer, DataConfig(dataset="pydoc")


def eval_units(rows: Sequence[str], contexts: Sequence[int], mse_context: int | None, passkey_lengths: Sequence[int],
               tasks: Sequence[str]) -> list[tuple[str, str, Any]]:
    """The units of work of an evaluation, in order, one progress step each: ``(row, kind, what)`` with kind
    ``perplexity`` (a context length), ``mse`` (its context), ``passkey`` (a prompt length) or ``lm-eval``
    (a task)."""
    units: list[tuple[str, str, Any]] = []
    for row in rows:
        units += [(row, "perplexity", c) for c in contexts]
        if mse_context is not None and row not in (*SOFTMAX_ROWS, "linearized_recall"):
            units.append((row, "mse", mse_context))
        units += [(row, "passkey", n) for n in passkey_lengths]
        units += [(row, "lm-eval", t) for t in tasks]
    return units


def _run_rows(hf_model: nn.Module, peft_model: Any, tokenizer: Any, device: torch.device, rows: Sequence[str],
              batches: dict[int, Tensor], mse_context: int | None, prompts: dict[int, list[Any]], taskset: Any,
              reporter: Reporter, **options: Any) -> dict[str, RowResult]:
    """Every unit of :func:`eval_units`, with one progress step (tokens, tokens/s) per unit."""
    from .passkey import passkey_accuracy

    tasks = list(taskset.names) if taskset is not None else []
    units = eval_units(rows, list(batches), mse_context, list(prompts), tasks)
    results = {row: RowResult(row) for row in rows}
    start, tokens = time.perf_counter(), 0
    reporter.start("eval", len(units), 0)
    try:
        for done, (row, kind, what) in enumerate(units, 1):
            result = results[row]
            with as_row(hf_model, row, peft_model=peft_model, sink_window=options["sink_window"], sinks=options["sinks"],
                        recall_slots=options.get("recall_slots")):
                if kind == "perplexity":
                    reporter.log(f"{row}: perplexity at {what} tokens")
                    ppl, past = perplexities(hf_model, {what: batches[what]}, device)
                    result.perplexity.update(ppl)
                    result.perplexity_past_1024.update(past)
                    tokens += batches[what].numel()
                elif kind == "mse":
                    reporter.log(f"{row}: attention MSE per layer at {what} tokens")
                    result.attention_mse = attention_mse(hf_model, batches[what], device)
                    tokens += batches[what].numel()
                elif kind == "passkey":
                    reporter.log(f"{row}: passkey retrieval, {len(prompts[what])} prompts at {what} tokens")
                    result.passkey.update(passkey_accuracy(hf_model, {what: prompts[what]}, device))
                    tokens += sum(len(p.prompt_ids) for p in prompts[what])
                else:
                    from .lm_eval_bridge import run_tasks

                    reporter.log(f"{row}: lm-eval {what}")
                    one = dataclasses.replace(taskset, names=(what,))
                    result.lm_eval.update(run_tasks(hf_model, tokenizer, one, num_fewshot=options["num_fewshot"],
                                                    limit=options["limit"], seed=options["seed"]))
            elapsed = max(time.perf_counter() - start, 1e-9)
            reporter.step(StepInfo(done, len(units), tokens, tokens / elapsed, float("nan"), 0.0))
    finally:
        reporter.finish()
    return results


def evaluate_run(
    run_dir: str | Path | None = None,
    model_id: str | None = None,
    *,
    text_file: str | Path | None = None,
    dataset: str | None = None,
    contexts: Sequence[int] = (512, 2048),
    passkey_lengths: Sequence[int] = (512, 1024, 2048),
    passkey_n: int = 20,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    device: str | torch.device | None = None,
    rows: Sequence[str] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    sink_window: int = SINK_WINDOW,
    sink_tokens: int = SINK_TOKENS,
    reporter: Reporter | None = None,
    recall_slots: int | None = None,
) -> EvalReport:
    """Compare the rows of :data:`ROWS` on perplexity, attention MSE, passkey retrieval and lm-eval tasks.

    ``recall_slots``: add the ``linearized_recall`` row (when ``rows`` is None) with this many recall-cache keys
    per KV head; with ``rows`` naming that row and no ``recall_slots``, ``LOLCATS_RECALL_SLOTS`` or its default.

    ``run_dir`` (a finished transfer or finetune run) or ``model_id`` (a plain model: teacher and sink rows
    only). ``max_tokens`` caps the tokens evaluated per context length (None = all the text). Every argument
    is checked before the first forward pass: a bad value fails in seconds, not after an hour of evaluation.
    """
    from ..model.models import max_positions
    from ..runs.workspace import pick_device
    from .passkey import build_prompts

    start = time.perf_counter()
    reporter = reporter or NullReporter()
    converted_run = _check_arguments(run_dir, model_id, text_file, dataset, passkey_lengths, passkey_n, max_tokens,
                                     sink_window, sink_tokens)
    chosen = _pick_rows(rows, converted_run)
    if recall_slots is not None:
        if recall_slots < 0:
            raise ConfigError(f"recall_slots={recall_slots}: a recall cache holds 0 or more keys", "e.g. --recall 64")
        if not converted_run:
            raise ConfigError("the recall-cache row needs a linearized run; a plain --model has no linear branch",
                              "pass a run directory instead of --model")
        chosen = list(dict.fromkeys([*chosen, "linearized_recall"]))
    taskset = None
    if tasks:
        from .lm_eval_bridge import resolve_tasks

        taskset = resolve_tasks(list(tasks), include_path)
    device = pick_device(device)
    hf_model, peft_model, tokenizer, data_cfg = _load(run_dir, model_id, device)
    limit_pos = max_positions(hf_model)
    contexts = _lengths(contexts, "--contexts", limit_pos)
    passkey_lengths = _lengths(passkey_lengths, "--passkey", limit_pos)

    stream, what = (torch.zeros(0, dtype=torch.long), "none")
    batches: dict[int, Tensor] = {}
    if contexts:
        stream, what = load_tokens(tokenizer, text_file=text_file, dataset=dataset, data_cfg=data_cfg,
                                   whole=not converted_run)
        batches = {c: windows(stream, c, max_tokens, what) for c in contexts}
    prompts = {n: build_prompts(tokenizer, n, passkey_n, seed) for n in passkey_lengths}
    mse_context = max(contexts) if contexts and converted_run else None
    if device.type == "cpu" and (warning := cpu_load_warning(chosen, batches, prompts)):
        reporter.log(warning)

    results = _run_rows(hf_model, peft_model, tokenizer, device, chosen, batches, mse_context, prompts, taskset,
                        reporter, num_fewshot=num_fewshot, limit=limit, seed=seed, sink_window=sink_window,
                        sinks=sink_tokens, recall_slots=recall_slots)  # fmt: skip

    return EvalReport(
        source=str(run_dir if run_dir is not None else model_id), kind="run" if converted_run else "model",
        text=what, text_tokens=int(stream.numel()), contexts=contexts, passkey_lengths=passkey_lengths,
        passkey_n=passkey_n, seed=seed, tasks=list(taskset.names) if taskset else [], mse_context=mse_context,
        rows=results, max_tokens=max_tokens, wall_time_s=time.perf_counter() - start,
        softmax_layers=softmax_layers_of(hf_model) if converted_run else [],
    )  # fmt: skip


__all__ = [
    "ROWS", "DEFAULT_ROWS", "SOFTMAX_ROWS", "SINK_WINDOW", "SINK_TOKENS", "RowResult", "EvalReport", "evaluate_run",
    "as_row", "cpu_load_warning", "sink_attention", "sink_mask", "zero_linear_branch", "recall_kernel", "token_nll", "mean_token_nll",
    "perplexities",
    "attention_mse", "load_tokens", "windows",
]
