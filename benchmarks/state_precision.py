"""Decode quality of the linear state's dtype (``LOLCATS_STATE_DTYPE``) on held-out text, teacher-forced.

For ``--rows`` windows of the held-out text: the model reads ``--prompt`` tokens (prefill), then the static
decoder (:class:`~lolcats_cli.core.decode.static_decode.StaticDecoder`, the path of ``generate`` and ``chat``;
without a CUDA graph off CUDA) is fed the next ``--steps`` tokens one at a time, each step scoring the token after
it. That runs once with each layer's S in fp32 and once in bf16. The same positions are scored by one
whole-sequence forward (the parallel form) as the reference. Prints the perplexity of the decoded positions for the
three, their ratios, and how far the logits of each state dtype are from the sequence form's; writes JSON::

    python benchmarks/state_precision.py RUN --heldout heldout.txt --prompt 1024 --steps 512 --json out.json

RUN is a finished ``lolcats transfer`` or ``lolcats finetune`` run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def decoded_nll(model, rows: torch.Tensor, prompt: int, steps: int, s_dtype: torch.dtype | None):  # noqa: ANN001
    """Per-token NLL ``(B, steps)`` of rows[:, prompt + 1 : prompt + steps + 1], and the logits ``(B, steps, V)``:
    prefill ``rows[:, :prompt]``, then static-decoder steps with S in ``s_dtype`` (None: the sequence form)."""
    from transformers import DynamicCache

    from lolcats_cli.core.decode.static_decode import StaticDecoder
    from lolcats_cli.hf_compat import cache_kwarg, last_logits_kwargs

    targets = rows[:, prompt + 1 : prompt + steps + 1]
    if s_dtype is None:
        logits = model(input_ids=rows[:, : prompt + steps]).logits[:, prompt:].float()
    else:
        cache = DynamicCache()
        model(input_ids=rows[:, :prompt], use_cache=True, **{cache_kwarg(model): cache}, **last_logits_kwargs(model))
        decoder = StaticDecoder(model, rows.shape[0], s_dtype=s_dtype)
        decoder.load(cache)
        logits = torch.stack([decoder.step(rows[:, prompt + t]).float().clone() for t in range(steps)], dim=1)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished transfer or finetune run directory")
    ap.add_argument("--heldout", type=Path, required=True, help="text the run never trained on (.txt)")
    ap.add_argument("--prompt", type=int, default=1024, help="tokens read before decoding starts")
    ap.add_argument("--steps", type=int, default=512, help="tokens decoded (and scored) after the prompt")
    ap.add_argument("--rows", type=int, default=2, help="held-out windows, decoded as one batch")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from lolcats_cli.core.runs.workspace import open_run

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, model, tokenizer = open_run(args.run, device=device)
    ids = tokenizer(args.heldout.read_text(), return_tensors="pt").input_ids[0]
    n = args.prompt + args.steps + 1
    if ids.numel() < n * args.rows:
        raise SystemExit(f"--heldout has {ids.numel()} tokens; {args.rows} rows of {n} need {n * args.rows}")
    rows = ids[: n * args.rows].view(args.rows, n).to(device)
    results: dict[str, dict] = {}
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, dt in (("sequence form", None), ("fp32 state", torch.float32), ("bf16 state", torch.bfloat16)):
            start = time.perf_counter()
            nll, logits[name] = decoded_nll(model, rows, args.prompt, args.steps, dt)
            results[name] = {"perplexity": math.exp(nll.mean().item()), "seconds": time.perf_counter() - start}
            ref = logits["sequence form"]
            err = (logits[name] - ref).abs()
            results[name].update(max_abs_logit_diff=err.max().item(), mean_abs_logit_diff=err.mean().item(),
                                 same_argmax=(logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item())
    base = results["sequence form"]["perplexity"]
    print(f"{args.run}: {args.rows} rows, prompt {args.prompt}, {args.steps} decoded tokens each, {device}")
    for name, r in results.items():
        r["ratio_to_sequence_form"] = r["perplexity"] / base
        print(f"  {name:14s} perplexity {r['perplexity']:.4f} ({r['ratio_to_sequence_form']:.5f}x)  logits vs "
              f"sequence form: max |diff| {r['max_abs_logit_diff']:.4f}, mean {r['mean_abs_logit_diff']:.5f}, "
              f"same argmax {r['same_argmax']:.2%}  [{r['seconds']:.0f} s]")
    if args.json:
        meta = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
