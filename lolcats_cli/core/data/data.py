"""Training text -> packed token sequences (the reference's Alpaca pipeline, generalised).

Every example is a ``prompt`` and a ``response``; plain text has an empty prompt. An example becomes
``tokens(prompt, with the tokenizer's BOS) + tokens(response) + [EOS]``; labels are -100 on the prompt
tokens (finetune's prompt masking) and equal the tokens elsewhere. Examples are concatenated in order and
cut into sequences of ``data.seq_len`` tokens; the last partial sequence is dropped (as the reference).

Held-out data: the first ``data.holdout`` examples (the reference holds out the first 200 Alpaca samples),
packed the same way. Sources made of a few long documents (``pydoc``, ``.txt``) hold out by tokens
instead: the first ``holdout`` sequences of the token stream. Nothing is shuffled here (the trainer
shuffles sequences per epoch with its seed), so the output is a pure function of the recipe and tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import DataError
from ..eval.passkey import build_prompts
from .data_sources import Record, columns, read_records, stream_source

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass
class Example:
    """One training example: no loss on ``prompt`` when prompts are masked; ``special_tokens`` lets the
    tokenizer add its BOS (False for chat-templated text, which carries its own)."""

    prompt: str
    response: str
    special_tokens: bool = True


@dataclasses.dataclass
class PackedData:
    """Packed sequences: ``input_ids`` ``(N, seq_len)`` int64 and ``labels`` ``(N, seq_len)`` int64 with
    -100 on prompt tokens. ``stats``: examples, tokens, dropped_tokens, template, holdout_by."""

    input_ids: Tensor
    labels: Tensor
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def resolve_template(data_cfg: Any, cols: list[str]) -> str:
    """The template for columns ``cols``: ``data.template``, or the one "auto" detects."""
    template = data_cfg.template
    if template != "auto":
        return template
    if data_cfg.text_field is not None:
        return "text"
    if {"instruction", "output"} <= set(cols):
        return "alpaca"
    if {"messages", "conversations"} & set(cols):
        return "chat"
    return "text"


def load_texts(data_cfg: Any, tokenizer: Any = None) -> list[Example]:
    """The examples of ``data_cfg`` (a DataConfig) in source order; the chat template needs ``tokenizer``."""
    return _load(data_cfg, tokenizer)[0]


def _load(data_cfg: Any, tokenizer: Any) -> tuple[list[Example], str]:
    """``(examples, template used)``."""
    records = read_records(data_cfg.dataset, data_cfg.split)
    if not records:
        raise DataError(f"data.dataset: {data_cfg.dataset!r} is empty (no records)", "use a dataset with some text")
    cols = columns(records)
    template = resolve_template(data_cfg, cols)
    if template == "alpaca":
        return [_alpaca(r, i, cols) for i, r in enumerate(records, 1)], template
    if template == "chat":
        return [_chat(r, tokenizer, cols) for r in records], template
    field = data_cfg.text_field or "text"
    if field not in cols:
        raise DataError(
            f"data.text_field: the dataset has no column {field!r}; its columns: {', '.join(cols) or 'none'}",
            "set data.text_field to the column holding the text, or data.template to alpaca / chat",
        )
    return [Example("", r.get(field) if isinstance(r.get(field), str) else "") for r in records], template


def _alpaca(r: Record, i: int, cols: list[str]) -> Example:
    missing = [c for c in ("instruction", "output") if not isinstance(r.get(c), str)]
    if missing:
        raise DataError(
            f"data.template: record {i} has no text in {', '.join(missing)} (the alpaca template needs "
            f"instruction, input, output); columns: {', '.join(cols)}",
            "set data.template=text with data.text_field, or fix the record",
        )
    extra = r.get("input") or ""
    fill = {"instruction": r["instruction"], "input": extra}
    prompt = (ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT).format_map(fill)
    return Example(prompt, r["output"])


def _messages(r: Record, cols: list[str]) -> list[dict[str, str]]:
    if isinstance(r.get("messages"), list):
        return [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
    if isinstance(r.get("conversations"), list):  # ShareGPT: {"from": "human", "value": ...}
        return [{"role": _SHAREGPT_ROLES.get(m.get("from"), "user"), "content": m.get("value", "")} for m in r["conversations"]]
    if isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
    raise DataError(
        f"data.template: chat needs a 'messages' or 'conversations' column (or instruction/output); columns: {', '.join(cols)}",
        "set data.template to text or alpaca",
    )


def _chat(r: Record, tokenizer: Any, cols: list[str]) -> Example:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template: chat needs a tokenizer with a chat template", "set data.template to alpaca or text")
    msgs = _messages(r, cols)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not msgs or msgs[-1]["role"] != "assistant":
        return Example("", full, special_tokens=False)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):  # a template that rewrites earlier turns: train on everything
        return Example("", full, special_tokens=False)
    return Example(prompt, full[len(prompt):], special_tokens=False)


def tokenize(examples: list[Example], tokenizer: Any, chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)``: every example as ``prompt + response + [EOS]``, concatenated (int64 arrays)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate packed examples", "use a model whose tokenizer defines eos_token")
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        for flag in (True, False):
            group = [e for e in part if e.special_tokens is flag and (e.prompt or e.response)]
            if not group:
                continue
            prompts = tokenizer([e.prompt for e in group], add_special_tokens=flag, verbose=False)["input_ids"]
            answers = tokenizer([e.response for e in group], add_special_tokens=False, verbose=False)["input_ids"]
            for p, a in zip(prompts, answers):
                seq = np.asarray([*p, *a, eos], dtype=np.int64)
                lab = seq.copy()
                lab[: len(p)] = IGNORE
                ids.append(seq)
                labels.append(lab)
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.concatenate(labels)


def pack(ids: np.ndarray, labels: np.ndarray, seq_len: int, **stats: Any) -> PackedData:
    """Cut a token stream into ``(N, seq_len)`` sequences, dropping the last partial one."""
    n = len(ids) // seq_len
    used = n * seq_len
    stats.update(tokens=int(used), dropped_tokens=int(len(ids) - used))
    return PackedData(
        torch.from_numpy(ids[:used].reshape(n, seq_len).copy()),
        torch.from_numpy(labels[:used].reshape(n, seq_len).copy()),
        stats,
    )


def build_datasets(data_cfg: Any, tokenizer: Any) -> tuple[PackedData, PackedData]:
    """``(train, heldout)`` packed sequences for ``data_cfg`` (a DataConfig); see the module docstring.

    Raises DataError for an empty source, too few tokens for one training sequence, or held-out
    examples too short for one sequence.
    """
    examples, template = _load(data_cfg, tokenizer)
    seq_len, holdout, cap = data_cfg.seq_len, data_cfg.holdout, data_cfg.max_samples
    source = data_cfg.dataset
    if stream_source(source):
        ids, labels = tokenize(examples, tokenizer)
        cut = holdout * seq_len
        most = (len(ids) - seq_len) // seq_len  # the most held-out sequences that leave one to train on
        _need(len(ids) - cut, seq_len, f"{source!r} gives {len(ids):,} tokens; after holding out {holdout} "
              f"sequences ({cut:,} tokens) that leaves",
              (f"lower data.holdout (data.holdout={min(most, 16)} leaves {len(ids) // seq_len - min(most, 16):,} "
               "training sequences)" if most >= 1 else "lower data.holdout") + " or data.seq_len, or add text")
        held = pack(ids[:cut], labels[:cut], seq_len, holdout_by="sequences")
        train = pack(ids[cut:], labels[cut:], seq_len, examples=len(examples), holdout_by="sequences")
        if cap is not None:
            train = PackedData(train.input_ids[:cap], train.labels[:cap], train.stats)
    else:
        kept = examples[holdout:] if cap is None else examples[holdout : holdout + cap]
        h_ids, h_labels = tokenize(examples[:holdout], tokenizer)
        t_ids, t_labels = tokenize(kept, tokenizer)
        if holdout:
            _need(len(h_ids), seq_len, f"the {min(holdout, len(examples))} held-out examples hold",
                  "raise data.holdout or lower data.seq_len")
        _need(len(t_ids), seq_len, f"{source!r} gives {len(kept):,} training examples (after the {holdout} "
              "held out), with", "lower data.seq_len or data.holdout, or use more data")
        held = pack(h_ids, h_labels, seq_len, examples=min(holdout, len(examples)), holdout_by="examples")
        train = pack(t_ids, t_labels, seq_len, examples=len(kept), holdout_by="examples")
    for part in (train, held):
        part.stats["template"] = template
    fraction = getattr(data_cfg, "passkey_fraction", 0.0) or 0.0
    if fraction > 0:
        train = mix_passkeys(train, tokenizer, fraction, seed=PASSKEY_TRAIN_SEED)
    return train, held


PASSKEY_TRAIN_SEED = 1_000_003  # training keys never repeat the evaluation's (lolcats eval uses seed 0)


def passkey_sequences(tokenizer: Any, seq_len: int, n: int, seed: int) -> PackedData:
    """``n`` passkey-retrieval prompts of at most ``seq_len`` tokens, right-padded to ``seq_len``; labels are
    -100 except on the answer tokens (the key), so cross-entropy learns to retrieve and nothing else."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, seq_len), int(pad if pad is not None else 0), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for i, p in enumerate(build_prompts(tokenizer, seq_len, n, seed)):
        row = p.prompt_ids + p.answer_ids
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(p.prompt_ids) : len(row)] = torch.tensor(p.answer_ids)
    return PackedData(ids, labels, {"passkey_sequences": n})


def mix_passkeys(train: PackedData, tokenizer: Any, fraction: float, seed: int) -> PackedData:
    """``train`` with passkey sequences (:func:`passkey_sequences`) making up ``fraction`` of the result,
    placed at seeded random rows. ``stats["passkey_sequences"]`` says how many."""
    n = round(len(train) * fraction / (1 - fraction))
    if n == 0:
        return train
    extra = passkey_sequences(tokenizer, train.input_ids.shape[1], n, seed)
    order = torch.randperm(len(train) + n, generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([train.input_ids, extra.input_ids])[order]
    labels = torch.cat([train.labels, extra.labels])[order]
    return PackedData(ids, labels, {**train.stats, "passkey_sequences": n})


def check_data_budget(recipe: Any, stage: str = "transfer", tokenizer: Any = None) -> PackedData:
    """Before any weights load: pack the recipe's data with the model's tokenizer (only the tokenizer is
    read), so that a dataset too small for the held-out part plus one training sequence fails now, with
    :func:`build_datasets`'s DataError. When the training sequences cannot fill the updates that
    ``<stage>.max_steps`` / ``max_tokens`` ask for, warn with the numbers: the run would stop early.
    Returns the training sequences."""
    import logging
    import math

    from ..model.models import load_tokenizer

    train, _ = build_datasets(recipe.data, tokenizer if tokenizer is not None else load_tokenizer(recipe.model))
    cfg, seq_len = getattr(recipe, stage), recipe.data.seq_len
    per_step = cfg.batch_size * cfg.grad_accum
    asked = [n for n in (cfg.max_steps, None if cfg.max_tokens is None else
                         math.ceil(cfg.max_tokens / (per_step * seq_len))) if n is not None]
    can = math.ceil(cfg.epochs * math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    if asked and can < min(asked):
        want = min(asked)
        key = f"{stage}.max_steps={cfg.max_steps}" if cfg.max_steps == want else f"{stage}.max_tokens={cfg.max_tokens:,}"
        epochs = math.ceil(want * per_step / max(len(train), 1))
        logging.getLogger(__name__).warning(
            f"data: {key} asks for {want} updates of {per_step} x {seq_len} tokens ({want * per_step:,} sequences), "
            f"but {recipe.data.dataset!r} gives {len(train):,} training sequences after the held-out ones, so "
            f"{stage}.epochs={cfg.epochs} passes make {can} updates and the run stops there; for all {want}, "
            f"set {stage}.epochs={epochs}, lower data.seq_len, or use more text (data.dataset)"
        )
    return train


def _need(tokens: int, seq_len: int, what: str, fix: str) -> None:
    if tokens < seq_len:
        raise DataError(
            f"data.seq_len: {what} {max(tokens, 0):,} tokens, fewer than one sequence of data.seq_len={seq_len}",
            f"{fix} (data.seq_len={max(tokens, 2)} would fit)" if tokens >= 2 else fix,
        )


__all__ = [
    "Example", "PackedData", "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "IGNORE", "load_texts",
    "resolve_template", "tokenize", "pack", "build_datasets", "passkey_sequences", "mix_passkeys", "check_data_budget",
]
