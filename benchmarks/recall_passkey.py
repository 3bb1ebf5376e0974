"""Where the recall cache helps passkey retrieval, and where it does not: per prompt, whether the model with a
recall cache of N keys per KV head solves it, and how much of the key's digit tokens each layer's cache holds after
reading the prompt (the fraction of digit tokens per KV head, averaged; the key appears twice in the prompt).

    python benchmarks/recall_passkey.py RUN --lengths 2048,4096 --n 4 --slots 64,256 [--no-rescore] [--json F]

RUN: a finished transfer or finetune run. The recall kernel is sequential (chunks of 64 tokens): on a 2-core
CPU, SmolLM2-135M takes about 25 s per 2048-token prompt and 60 s per 4096-token one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def digit_positions(tokenizer: Any, prompt: Any) -> set[int]:
    """Positions in ``prompt.prompt_ids`` of every occurrence of the key's tokens."""
    from lolcats_cli.core.eval.passkey import _ids

    key, ids = _ids(tokenizer, " " + prompt.key), prompt.prompt_ids
    starts = [i for i in range(len(ids) - len(key) + 1) if ids[i : i + len(key)] == key]
    return {a + j for a in starts for j in range(len(key))}


@torch.no_grad()
def cache_cover(model: Any, prompt: Any, digits: set[int], device: torch.device) -> list[float]:
    """Per converted layer, the fraction of ``digits`` in its recall cache after the prompt, averaged over KV heads
    and rows."""
    from lolcats_cli.hf_compat import output_cache

    cache = output_cache(model(input_ids=torch.tensor([prompt.prompt_ids], device=device), use_cache=True))
    cover = []
    for layer in cache.layers:
        pos = layer.state.recall.pos  # (B, Hkv, M)
        per_head = [len(set(pos[b, h].tolist()) & digits) / len(digits) for b in range(pos.shape[0])
                    for h in range(pos.shape[1])]  # fmt: skip
        cover.append(sum(per_head) / len(per_head))
    return cover


def measure(run: Path, lengths: list[int], n: int, slots: list[int], rescore: bool, device: str = "cpu") -> dict:
    """``{"slots": {N: {length: {"solved": k, "n": n, "cover": [...per layer], "prompts": [...]}}}}``."""
    from lolcats_cli.core.eval.eval_rows import recall_kernel
    from lolcats_cli.core.eval.passkey import build_prompts, solved
    from lolcats_cli.core.runs.workspace import open_run
    from lolcats_cli.kernels.recall import RESCORE_ENV

    os.environ[RESCORE_ENV] = "1" if rescore else "0"
    dev = torch.device(device)
    _, model, tokenizer = open_run(run, dev)
    model.eval()
    results: dict = {"run": str(run), "rescore": rescore, "slots": {}}
    for m in slots:
        per_length = results["slots"][str(m)] = {}
        for length in lengths:
            rows = []
            with recall_kernel(model, m):
                for p in build_prompts(tokenizer, length, n, seed=0):
                    t = time.perf_counter()
                    digits = digit_positions(tokenizer, p)
                    cover = cache_cover(model, p, digits, dev)
                    rows.append({"key": p.key, "depth": p.depth, "solved": solved(model, p, dev),
                                 "cover": sum(cover) / len(cover), "cover_by_layer": cover,
                                 "s": time.perf_counter() - t})  # fmt: skip
                    print(f"slots {m:>4} length {length:>5} key {p.key} depth {p.depth:.2f} solved "
                          f"{rows[-1]['solved']!s:>5} digits cached {rows[-1]['cover']:.2f} "
                          f"({rows[-1]['s']:.0f} s)", flush=True)
            per_length[str(length)] = {"solved": sum(r["solved"] for r in rows), "n": len(rows), "prompts": rows}
            print(f"slots {m} length {length}: solved {per_length[str(length)]['solved']}/{len(rows)}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--lengths", default="2048")
    p.add_argument("--n", type=int, default=4, help="prompts per length")
    p.add_argument("--slots", default="64")
    p.add_argument("--no-rescore", dest="rescore", action="store_false",
                   help="keep each cached key's entry score (LOLCATS_RECALL_RESCORE=0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    got = measure(a.run, [int(x) for x in a.lengths.split(",")], a.n, [int(x) for x in a.slots.split(",")],
                  a.rescore, a.device)  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
