"""Quality ablation: transfer -> finetune -> eval of one model per variant, on text the runs never saw.

Each variant is a set of recipe overrides on one base recipe (by default the GPU recipe for SmolLM2). For
each it runs ``lolcats transfer`` and ``lolcats finetune`` (resumable: a finished stage is skipped, an
interrupted one resumes), then evaluates perplexity at every ``--contexts`` length (all positions, and past
position 1024) and passkey retrieval on ``--heldout`` text, beside the teacher and the training-free sink
window (64 keys + 4 sinks), which are evaluated once. It prints a table as multiples of the teacher's
perplexity and writes everything to ``OUT/quality.json`` after every variant, so a call that runs out of
time loses nothing: run it again with the same ``--out`` and it continues. Run it again with more ``--contexts``
/ ``--passkey`` lengths (or ``--recall N``) and only those are evaluated, for the baselines and for every
variant named in ``--variants`` whose runs are in ``--out``.

    python benchmarks/quality.py --model SmolLM2.gguf --train train.txt --heldout heldout.txt \\
        --out runs/quality --variants paper,sinks_gate --budget-s 540

Variants (``--variants``, comma-separated, in this order; 1024-token sequences unless named _2k):
  paper        the paper's method: no sinks, linear branch weight 1
  sinks        4 sinks, linear weight 1
  sinks_gate   4 sinks and the gated linear branch (starts closed)
  sinks_gate_decay      plus the learnable decay of the linear branch (64 to 4096 tokens)
  sinks_gate_decay_2k   the same on 2048-token sequences (batch 4: the same tokens per step and in all)
  sinks_gate_decay_2k_passkey  the same with 5% synthetic passkey sequences in both stages
  sinks_gate_decay_2k_random_window  sinks_gate_decay_2k with a window size drawn per training batch from
                        32 / 48 / 64 / 96 / 128 (attention.train_window_sizes), evaluated at 64
  sinks_gate_decay_2k_random_window_passkey  the same with 5% synthetic passkey sequences
  sinks_gate_decay_2k_delta  sinks_gate_decay_2k with a delta-rule linear state (attention.delta_rule)
  sinks_gate_decay_4k   the same on 4096-token sequences (batch 2)
  sinks_gate_decay_4k_8m  the same with 8M tokens (4.5M of stage 1, 3.5M of LoRA) instead of 3.5M: the shipped
                        GPU recipe (smollm2-135m-gpu)
  sinks_gate_decay_4k_kl  sinks_gate_decay_4k with LoRA trained on the KL to the teacher (finetune.objective=kl)
  window_lora  the same layers with training-free attention (stage 1 runs one step at lr 1e-9, so the gate
               stays closed: a terrace window + 4 sinks), then LoRA at the same budget: no linear branch
  window_lora_2k  the same on 2048-token sequences: the honest competitor of sinks_gate_decay_2k
  window_lora_4k  the same on 4096-token sequences: the competitor of sinks_gate_decay_4k
  window_lora_4k_8m  the same with 3.5M tokens of LoRA: the competitor of sinks_gate_decay_4k_8m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lolcats_cli.core.runs.rundir import METRICS, finished_run, has_checkpoint

# Sequence length and batch (the same tokens per step); every variant states all it depends on, so a change of
# the base recipe does not change what a variant measures.
K1 = ["data.seq_len=1024", "transfer.batch_size=8", "finetune.batch_size=8"]
K2 = ["data.seq_len=2048", "transfer.batch_size=4", "finetune.batch_size=4"]
K4 = ["data.seq_len=4096", "transfer.batch_size=2", "finetune.batch_size=2"]
SINKS_GATE = ["attention.window_params.sinks=4", "attention.linear_gate=true"]
RANDOM_WINDOW = ["attention.train_window_sizes=[32,48,64,96,128]"]
NO_TRAINING = ["transfer.max_steps=1", "transfer.lr=1e-9", "transfer.max_tokens=null"]  # stage 1 changes nothing
VARIANTS: dict[str, list[str]] = {
    "paper": ["attention.window_params.sinks=0", "attention.linear_gate=false", "attention.decay=false", *K1],
    "sinks": ["attention.window_params.sinks=4", "attention.linear_gate=false", "attention.decay=false", *K1],
    "sinks_gate": [*SINKS_GATE, "attention.decay=false", *K1],
    "sinks_gate_decay": [*SINKS_GATE, "attention.decay=true", *K1],
    "sinks_gate_decay_2k": [*SINKS_GATE, "attention.decay=true", *K2],
    "sinks_gate_decay_2k_passkey": [*SINKS_GATE, "attention.decay=true", *K2, "data.passkey_fraction=0.05"],
    "sinks_gate_decay_2k_random_window": [*SINKS_GATE, "attention.decay=true", *K2, *RANDOM_WINDOW],
    "sinks_gate_decay_2k_random_window_passkey": [*SINKS_GATE, "attention.decay=true", *K2, *RANDOM_WINDOW,
                                                  "data.passkey_fraction=0.05"],
    "sinks_gate_decay_2k_delta": [*SINKS_GATE, "attention.decay=true", "attention.delta_rule=true", *K2],
    "sinks_gate_decay_4k": [*SINKS_GATE, "attention.decay=true", *K4],
    "sinks_gate_decay_4k_8m": [*SINKS_GATE, "attention.decay=true", *K4, "transfer.max_tokens=4500000",
                               "finetune.max_tokens=3500000"],
    # the shipped GPU recipe trained through the chunked PyTorch kernel (issue 12: the fused kernel's quality goal)
    "sinks_gate_decay_4k_8m_chunked": [*SINKS_GATE, "attention.decay=true", *K4, "transfer.max_tokens=4500000",
                                       "finetune.max_tokens=3500000", "attention.kernel=chunked"],
    # sinks_gate_decay_4k through the chunked kernel: the fused kernel's quality goal at 3.5M tokens (issue 12)
    "sinks_gate_decay_4k_chunked": [*SINKS_GATE, "attention.decay=true", *K4, "attention.kernel=chunked"],
    "sinks_gate_decay_4k_kl": [*SINKS_GATE, "attention.decay=true", *K4, "finetune.objective=kl"],
    "window_lora_4k": [*SINKS_GATE, "attention.decay=false", *NO_TRAINING, *K4],
    "window_lora_4k_8m": [*SINKS_GATE, "attention.decay=false", *NO_TRAINING, *K4, "finetune.max_tokens=3500000"],
    "window_lora": [*SINKS_GATE, "attention.decay=false", *NO_TRAINING, *K1],
    "window_lora_2k": [*SINKS_GATE, "attention.decay=false", *NO_TRAINING, *K2],
}


def lolcats(*args: str) -> None:
    """Run the CLI (``python -m lolcats_cli``) in this Python; raise on failure."""
    cmd = [sys.executable, "-m", "lolcats_cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stage(kind: str, run: Path, args: list[str]) -> float:
    """Run one training stage into ``run`` unless it finished already; resume an interrupted one. Seconds."""
    if finished_run(run) is not None:
        print(f"{run}: finished, skipped", flush=True)
        return 0.0
    start = time.perf_counter()
    resume = ["--resume"] if has_checkpoint(run) else []
    if kind == "transfer":
        lolcats("transfer", "--output", str(run), *resume, *args)
    else:
        lolcats("finetune", *args[:1], "--output", str(run), *resume, *args[1:])
    return time.perf_counter() - start


def stage_args(name: str, run: Path, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The ``lolcats transfer`` and ``lolcats finetune`` arguments of variant ``name`` into ``run``: the token
    budgets of ``args`` first, then the variant's overrides (its ``finetune.*`` ones again on the finetune
    command, after its budget), so a variant can state its own budget or LoRA settings."""
    common = [f"data.dataset={args.train}", *args.extra.split()]
    own = VARIANTS[name]
    transfer = ["--model", args.model, "--recipe", args.recipe, *common,
                f"transfer.max_tokens={args.transfer_tokens}", *own]
    finetune = [str(run / "transfer"), *common, f"finetune.max_tokens={args.finetune_tokens}",
                *(o for o in own if o.startswith("finetune."))]
    return transfer, finetune


RECALL = "linearized_recall"  # the recall-cache row of 64 slots; other sizes: linearized_recall_N


def recall_row(slots: int) -> str:
    """The stored name of the recall-cache row with ``slots`` keys per KV head."""
    return RECALL if slots == 64 else f"{RECALL}_{slots}"


def recall_slots(row: str) -> int | None:
    """The slots of a recall-cache row name, None for other rows."""
    if row == RECALL:
        return 64
    return int(row.rsplit("_", 1)[1]) if row.startswith(RECALL + "_") else None


def evaluate(run: Path | None, model: str | None, rows: list[str], args: argparse.Namespace,
             have: dict | None = None) -> dict:
    """``{row: results}`` of ``rows`` at every ``--contexts`` / ``--passkey`` length, evaluating only what
    ``have`` (earlier results of the same rows) lacks: a rerun with a new length or row fills in just that.
    The recall-cache row runs a sequential form (chunk by chunk), so its perplexity is measured only at
    ``--recall-contexts`` (none by default); its passkey at every ``--passkey`` length."""
    plain = [r for r in rows if recall_slots(r) is None]
    out = _evaluate(run, model, plain, args, have, args.contexts) if plain else {}
    for row in rows:
        if (slots := recall_slots(row)) is not None:
            mine = {RECALL: have[row]} if have and row in have else None
            got = _evaluate(run, model, [RECALL], args, mine, getattr(args, "recall_contexts", []), slots)
            out[row] = got[RECALL]
    return out


def _evaluate(run: Path | None, model: str | None, rows: list[str], args: argparse.Namespace, have: dict | None,
              contexts: list[int], slots: int | None = None) -> dict:
    from lolcats_cli.core.eval.evaluate import evaluate_run

    have = {name: row for name, row in (have or {}).items() if name in rows}
    lacking = [r for r in rows if r not in have]
    contexts = [c for c in contexts if lacking or any(str(c) not in have[r]["perplexity"] for r in rows)]
    passkey = [n for n in args.passkey if lacking or any(str(n) not in have[r]["passkey"] for r in rows)]
    if not contexts and not passkey:
        return have
    report = evaluate_run(
        run, None if run is not None else model, text_file=args.heldout, contexts=contexts, passkey_lengths=passkey,
        passkey_n=args.passkey_n, rows=rows, max_tokens=args.max_tokens,
        recall_slots=slots,
    )  # fmt: skip
    got = report.to_dict()["rows"]
    for name, row in got.items():
        old = have.get(name)
        if old is not None:  # merge the new lengths into the earlier results
            for key in ("perplexity", "perplexity_past_1024", "passkey"):
                row[key] = {**old.get(key, {}), **row.get(key, {})}
    return {**have, **got}


def evaluate_each(run: Path | None, model: str | None, rows: list[str], args: argparse.Namespace, have: dict,
                  saved: Callable[[dict], None]) -> dict:
    """:func:`evaluate` one row at a time, ``saved`` called with the results so far after each row it evaluated:
    a call cut short keeps the rows it finished, and a rerun evaluates only what is missing."""
    for row in rows:
        got = evaluate(run, model, [row], args, have)
        if got != {k: v for k, v in have.items() if k == row}:
            have = {**have, **got}
            saved(have)
    return have


def finish(run: Path, done: dict, rows: list[str], args: argparse.Namespace, save: Callable[[], None]) -> None:
    """Evaluate a trained variant row by row into ``done["eval"]`` (saving after each) and record its stages'
    metrics."""
    t, before = time.perf_counter(), done.get("eval_s", 0.0)

    def saved(evaluated: dict) -> None:
        done["eval"] = evaluated
        done["eval_s"] = before + time.perf_counter() - t
        save()

    done["eval"] = evaluate_each(run / "finetune", None, rows, args, done.get("eval", {}), saved)
    for kind in ("transfer", "finetune"):
        metrics = run / kind / METRICS
        if metrics.exists() and f"{kind}_metrics" not in done:
            done[f"{kind}_metrics"] = json.loads(metrics.read_text())
            save()


def ratio_table(results: dict) -> str:
    """Markdown: each row's perplexity as a multiple of the teacher's (all / past 1024), and passkey."""
    teacher = results.get("baselines", {}).get("teacher")
    if not teacher:
        return "(no teacher row yet)"
    contexts = sorted(int(c) for c in teacher["perplexity"])
    passkeys = sorted(int(n) for n in teacher["passkey"])
    head = ["row"] + [f"ppl@{c} (x teacher)" for c in contexts] + [f"passkey@{n}" for n in passkeys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(row: dict) -> list[str]:
        cells = []
        for c in contexts:
            value, base = row["perplexity"].get(str(c)), teacher["perplexity"].get(str(c))
            past, past_base = row["perplexity_past_1024"].get(str(c)), teacher["perplexity_past_1024"].get(str(c))
            cell = f"{value / base:.3f}" if value and base else "-"
            if past and past_base:
                cell += f" / {past / past_base:.3f}"
            cells.append(cell)
        cells += [f"{row['passkey'][str(n)] * 100:.0f}%" if str(n) in row["passkey"] else "-" for n in passkeys]
        return cells

    lines.append("| teacher (ppl " + ", ".join(f"{teacher['perplexity'][str(c)]:.2f}" for c in contexts) + ") | "
                 + " | ".join(fmt(teacher)) + " |")
    sink = results["baselines"].get("sink_window")
    if sink:
        lines.append("| sink window 64 + 4, no training | " + " | ".join(fmt(sink)) + " |")
    suffix = {"linearized": "", "linear_zeroed": ", linear branch zeroed"}
    for name, variant in results.get("variants", {}).items():
        evals = variant.get("eval", {})
        recalls = sorted((recall_slots(r), r) for r in evals if recall_slots(r) is not None)
        for row, label in [*suffix.items(), *((r, f", recall cache of {n} keys") for n, r in recalls)]:
            if row in evals:
                lines.append(f"| {name}{label} | " + " | ".join(fmt(evals[row])) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model (hub id, folder or .gguf)")
    p.add_argument("--recipe", default="smollm2-135m-gpu", help="base recipe (name or path)")
    p.add_argument("--train", required=True, help="training text (.txt, or any data.dataset value)")
    p.add_argument("--heldout", required=True, help="evaluation text the runs never see (.txt)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="paper,sinks_gate,window_lora")
    p.add_argument("--transfer-tokens", type=int, default=2_000_000)
    p.add_argument("--finetune-tokens", type=int, default=1_500_000)
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--passkey", default="1024,2048")
    p.add_argument("--passkey-n", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=65_536, help="perplexity tokens per context length")
    p.add_argument("--budget-s", type=float, default=None, help="start no new stage after this many seconds")
    p.add_argument("--extra", default="", help="overrides added to every variant, space-separated")
    p.add_argument("--recall", default="",
                   help="also evaluate each trained variant with a recall cache of this many keys per KV head "
                        "(a comma-separated list: one row per size, e.g. 64,256)")
    p.add_argument("--recall-contexts", default="",
                   help="perplexity lengths of the recall-cache row (default none: passkey only; it is sequential)")
    p.add_argument("--no-stage1-eval", dest="stage1_eval", action="store_false",
                   help="skip evaluating each variant after stage 1 alone (saves an evaluation per variant)")
    args = p.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    args.passkey = [int(c) for c in args.passkey.split(",") if c]
    args.recall_contexts = [int(c) for c in args.recall_contexts.split(",") if c]
    args.recall = [n for n in (int(x) for x in str(args.recall).split(",") if x) if n > 0]
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {"baselines": {}, "variants": {}}
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))
        (args.out / "quality.md").write_text(ratio_table(results) + "\n")

    def out_of_time() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    t, before = time.perf_counter(), results["baselines"].get("eval_s", 0.0)

    def saved_baselines(rows: dict) -> None:
        results["baselines"] = {**rows, "eval_s": before + time.perf_counter() - t}
        save()

    have = {k: v for k, v in results["baselines"].items() if k != "eval_s"}
    evaluate_each(None, args.model, ["teacher", "sink_window"], args, have, saved_baselines)
    final_rows = ["linearized", "linear_zeroed"] + [recall_row(n) for n in args.recall]
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        done = results["variants"].setdefault(name, {})
        if "eval" in done:  # trained and (partly) evaluated: only rows or lengths it lacks are evaluated
            if finished_run(args.out / name / "finetune") is not None:
                finish(args.out / name, done, final_rows, args, save)
            continue
        if out_of_time():
            print(f"budget reached before {name}: run again to continue", flush=True)
            break
        run = args.out / name
        transfer, finetune = stage_args(name, run, args)
        done["transfer_s"] = done.get("transfer_s", 0.0) + stage("transfer", run / "transfer", transfer)
        save()
        if out_of_time():
            break
        done["finetune_s"] = done.get("finetune_s", 0.0) + stage("finetune", run / "finetune", finetune)
        save()
        if out_of_time():
            break
        if args.stage1_eval:
            done["stage1_eval"] = evaluate(run / "transfer", None, ["linearized"], args)
        finish(run, done, final_rows, args, save)
    print(ratio_table(results), flush=True)
    print(f"wall {time.perf_counter() - start:.0f} s; results in {path}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
