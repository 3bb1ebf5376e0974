"""benchmarks/quality.py: a rerun evaluates only the lengths and rows the earlier results lack, and the table
shows what is missing as "-"."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from conftest import load_benchmark  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quality")


def _args(heldout: Path, contexts: list[int], **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"heldout": heldout, "contexts": contexts, "passkey": [], "passkey_n": 1,
                                 "max_tokens": 256, "recall": [], **kw})


def test_a_rerun_evaluates_only_the_new_lengths(bench, tiny_model_dir, tmp_path) -> None:
    from pydoc_data.topics import topics

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(topics.values())[:20_000])
    rows = ["teacher", "sink_window"]
    first = bench.evaluate(None, str(tiny_model_dir), rows, _args(heldout, [32]))
    assert set(first) == set(rows) and set(first["teacher"]["perplexity"]) == {"32"}
    first["teacher"]["perplexity"]["32"] = 123.0  # a value no evaluation gives: kept only if 32 is not evaluated again
    again = bench.evaluate(None, str(tiny_model_dir), rows, _args(heldout, [32, 64]), first)
    assert again["teacher"]["perplexity"]["32"] == 123.0
    assert set(again["sink_window"]["perplexity"]) == {"32", "64"} and again["teacher"]["perplexity"]["64"] > 1
    assert bench.evaluate(None, str(tiny_model_dir), rows, _args(heldout, [64]), again) == again  # nothing to do

    results = {"baselines": {"teacher": again["teacher"], "sink_window": first["sink_window"]}, "variants": {}}
    table = bench.ratio_table(results)
    assert "| teacher (ppl 123.00, " in table
    assert table.splitlines()[-1].endswith("| - |")  # the sink window has no 64-token perplexity yet


def test_a_variant_states_its_own_budget_after_the_default_one(bench, tmp_path) -> None:
    args = argparse.Namespace(train="t.txt", extra="", model="m", recipe="r", transfer_tokens=7, finetune_tokens=5)
    transfer, finetune = bench.stage_args("sinks_gate_decay_4k_8m", tmp_path / "v", args)
    # the last setting of a key wins in a lolcats override list
    assert [a for a in transfer if a.startswith("transfer.max_tokens=")][-1] == "transfer.max_tokens=4500000"
    assert [a for a in finetune if a.startswith("finetune.max_tokens=")][-1] == "finetune.max_tokens=3500000"
    assert finetune[0] == str(tmp_path / "v" / "transfer")
    plain_t, plain_f = bench.stage_args("sinks_gate_decay_4k", tmp_path / "v", args)
    assert "transfer.max_tokens=7" in plain_t
    assert [a for a in plain_f if a.startswith("finetune.max_tokens=")] == ["finetune.max_tokens=5"]
    _, kl = bench.stage_args("sinks_gate_decay_4k_kl", tmp_path / "v", args)
    assert kl[-1] == "finetune.objective=kl"


def test_the_recall_row_reads_perplexity_only_at_its_own_lengths(bench, tiny_model_dir, tmp_path) -> None:
    """The recall-cache row is sequential: by default only its passkey is measured, perplexity at
    --recall-contexts; the other rows at --contexts."""
    from pydoc_data.topics import topics

    from lolcats_cli.core.train.transfer import run_transfer
    from tiny_recipes import tiny_recipe

    run = tmp_path / "run"
    run_transfer(tiny_recipe(tiny_model_dir), run, device="cpu")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(topics.values())[:20_000])
    four = bench.recall_row(4)  # a recall-cache row per size: 64 keys keep the old name, others carry theirs
    assert (four, bench.recall_row(64), bench.recall_slots(four), bench.recall_slots("linearized")) == (
        "linearized_recall_4", bench.RECALL, 4, None)
    rows = ["linearized", four]
    args = _args(heldout, [64], passkey=[256], recall=[4], recall_contexts=[])
    got = bench.evaluate(run, None, rows, args)
    assert set(got) == set(rows)
    assert set(got["linearized"]["perplexity"]) == {"64"} and got[four]["perplexity"] == {}
    assert set(got[four]["passkey"]) == {"256"}
    args.recall_contexts = [64]
    again = bench.evaluate(run, None, rows, args, got)
    assert set(again[four]["perplexity"]) == {"64"} and again[four]["perplexity"]["64"] > 1
    assert again["linearized"] == got["linearized"]  # nothing new for it
    results = {"baselines": {"teacher": again["linearized"]}, "variants": {"v": {"eval": again}}}
    assert "| v, recall cache of 4 keys |" in bench.ratio_table(results)


def test_rows_are_evaluated_and_saved_one_at_a_time(bench, tiny_model_dir, tmp_path) -> None:
    """A call cut short keeps the rows it finished: each row is saved as it ends, and a rerun evaluates only the
    rows it lacks."""
    from pydoc_data.topics import topics

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(topics.values())[:20_000])
    snapshots = []
    got = bench.evaluate_each(None, str(tiny_model_dir), ["teacher", "sink_window"], _args(heldout, [32]), {},
                              lambda rows: snapshots.append(sorted(rows)))  # fmt: skip
    assert snapshots == [["teacher"], ["sink_window", "teacher"]]
    partial = {"teacher": got["teacher"]}
    partial["teacher"]["perplexity"]["32"] = 123.0  # a value no evaluation gives: kept only if it is not redone
    snapshots.clear()
    again = bench.evaluate_each(None, str(tiny_model_dir), ["teacher", "sink_window"], _args(heldout, [32]), partial,
                                lambda rows: snapshots.append(sorted(rows)))  # fmt: skip
    assert snapshots == [["sink_window", "teacher"]]  # only the missing row was evaluated
    assert again["teacher"]["perplexity"]["32"] == 123.0
    assert again["sink_window"]["perplexity"]["32"] == pytest.approx(got["sink_window"]["perplexity"]["32"])


def test_recall_passkey_reports_the_digits_each_cache_holds(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """benchmarks/recall_passkey.py on a tiny run: with a slot for every key, every layer's cache holds every digit
    token that has left the window (all those more than 48 tokens back, none of the last 16: window 16, terrace),
    with no slots none; the rescore switch reaches the kernel."""
    from transformers import AutoTokenizer

    from lolcats_cli.core.eval.passkey import build_prompts
    from lolcats_cli.core.train.transfer import run_transfer
    from lolcats_cli.kernels.recall import RESCORE_ENV
    from tiny_recipes import tiny_recipe

    monkeypatch.delenv(RESCORE_ENV, raising=False)
    rp = load_benchmark("recall_passkey")
    run = tmp_path / "run"
    run_transfer(tiny_recipe(tiny_model_dir), run, device="cpu")
    got = rp.measure(run, [200], 2, [0, 512], rescore=False)
    assert os.environ[RESCORE_ENV] == "0"
    none, every = got["slots"]["0"]["200"], got["slots"]["512"]["200"]
    assert none["n"] == every["n"] == 2 and all(r["cover"] == 0.0 for r in none["prompts"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    far_back = []
    for prompt, row in zip(build_prompts(tokenizer, 200, 2, seed=0), every["prompts"]):
        digits, T = rp.digit_positions(tokenizer, prompt), len(prompt.prompt_ids)
        assert len(digits) >= 2 and row["key"] == prompt.key
        surely_out = sum(d < T - 48 for d in digits) / len(digits)
        maybe_out = sum(d < T - 16 for d in digits) / len(digits)
        assert all(surely_out <= c <= maybe_out for c in row["cover_by_layer"])
        far_back.append(surely_out)
    assert max(far_back) > 0  # one key is far enough back that its digits must be cached
