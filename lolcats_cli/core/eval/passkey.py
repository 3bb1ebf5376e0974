"""Passkey retrieval: a 5-digit number hidden at a random depth in filler text, asked for at the end.

Linearized models are known to lose this ability (docs/method.md section 5); the test is cheap and exact.
A prompt of ``length`` tokens reads (in the style of Mohtashami and Jaggi's landmark-attention test)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. ...
    The grass is green. The sky is blue. ...  The pass key is 71432. Remember it. 71432 is the pass key.
    The grass is green. ...  What is the pass key? The pass key is

and the answer is `` 71432``. Scoring is greedy decoding done in one forward pass: the prompt and the
answer go in together, and a prompt counts as solved when the argmax at every answer position is the
answer's next token. That is exactly the condition for greedy decoding to produce the answer's tokens,
without a KV cache or a generation loop (so every attention mode is scored the same way).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import ConfigError
from ..train.precision import autocast_for

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``prompt_ids`` (the tokens before the answer), ``answer_ids``, the key and its depth
    (the fraction of filler before the key, 0 = right after the introduction)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    key: str
    depth: float


def _ids(tokenizer: Any, text: str, specials: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def build_prompts(tokenizer: Any, length: int, n: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``n`` prompts whose prompt + answer tokens number at most ``length`` (as close as the filler allows).

    Deterministic in ``seed`` and ``length``; every row of an evaluation sees the same prompts. ConfigError
    when ``length`` cannot hold the introduction, the key, one filler sentence and the question.
    """
    rng = random.Random(f"passkey-{seed}-{length}")
    head, filler, question = _ids(tokenizer, INTRO, specials=True), _ids(tokenizer, FILLER), _ids(tokenizer, QUESTION)
    prompts = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        key_ids, answer = _ids(tokenizer, KEY.format(key=key)), _ids(tokenizer, ANSWER.format(key=key))
        room = length - len(head) - len(key_ids) - len(question) - len(answer)
        units = room // len(filler)
        if units < 1:
            need = length - room + len(filler)
            raise ConfigError(
                f"passkey length {length} is too short for a passkey prompt with this tokenizer "
                f"(it needs at least {need} tokens)",
                f"use --passkey lengths of {need} or more, e.g. --passkey 512,1024,2048",
            )
        before = rng.randint(0, units)
        ids = head + filler * before + key_ids + filler * (units - before) + question
        prompts.append(PasskeyPrompt(ids, answer, key, before / units))
    return prompts


@torch.no_grad()
def solved(model: torch.nn.Module, prompt: PasskeyPrompt, device: torch.device) -> bool:
    """Whether greedy decoding of ``prompt`` yields exactly its answer tokens (one forward pass)."""
    ids = torch.tensor([prompt.prompt_ids + prompt.answer_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0]  # (T, vocab)
    start = len(prompt.prompt_ids) - 1  # the position whose output is the first answer token
    predicted = logits[start : start + len(prompt.answer_ids)].argmax(dim=-1)
    return predicted.tolist() == prompt.answer_ids


def passkey_accuracy(
    model: torch.nn.Module, prompts_by_length: dict[int, Sequence[PasskeyPrompt]], device: torch.device
) -> dict[int, float]:
    """Fraction of prompts solved at each length, ``{length: accuracy in [0, 1]}``."""
    out: dict[int, float] = {}
    for length, prompts in prompts_by_length.items():
        with autocast_for(device):
            hits = sum(solved(model, p, device) for p in prompts)
        out[length] = hits / len(prompts) if prompts else float("nan")
    return out


__all__ = ["PasskeyPrompt", "build_prompts", "solved", "passkey_accuracy"]
