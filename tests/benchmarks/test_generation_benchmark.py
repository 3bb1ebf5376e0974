"""benchmarks/generation.py: model-shape presets, and a prefill that computes the last position's logits only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import BENCHMARKS, load_benchmark  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("generation")


def test_presets_give_the_models_shapes(bench) -> None:
    assert {"smollm2-135m", "llama-3.1-8b"} <= set(bench.PRESETS)
    llama = bench.preset_config("llama-3.1-8b")
    assert (llama.model_type, llama.num_hidden_layers, llama.hidden_size, llama.num_key_value_heads, llama.vocab_size) == (
        "llama", 32, 4096, 8, 128256)
    assert bench.preset_config("llama-3.1-8b", layers=2).num_hidden_layers == 2
    assert bench.preset_config("qwen2.5-0.5b").model_type == "qwen2"
    with pytest.raises(SystemExit, match="--preset 'llama-9b': unknown; choose one of smollm2-135m, llama-3.1-8b"):
        bench.preset_config("llama-9b")


@pytest.mark.parametrize("chunk", [16, 40, 64])
def test_prefill_computes_the_last_positions_logits_only(bench, tiny_model_dir, chunk) -> None:
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.decode.cache import make_cache
    from lolcats_cli.core.model.convert import convert_model

    model = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), window_params={"size": 8}).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[1]))
    try:
        logits = bench.prefill(model, make_cache(model), ids, chunk)
    finally:
        hook.remove()
    assert rows == [1] * -(-40 // chunk)  # one position per call, however many tokens it fed
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits[:, -1:]
    assert logits.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(logits, whole, atol=2e-4, rtol=2e-4)


def _run(tmp_path, *args: str) -> tuple[str, list[dict]]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "generation.py"), "--preset", "smollm2-135m", "--layers", "1", "--contexts", "24", "--steps", "2",
         "--warmup", "1", "--prefill-chunk", "16", "--threads", "1", "--device", "cpu", "--json", str(out), *args],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # set by the Triton tests' module
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())["results"]


def test_the_benchmark_runs_every_engine_and_writes_json(tmp_path) -> None:
    stdout, rows = _run(tmp_path, "--batch-sizes", "1", "2", "--prefill", "synthetic")
    assert "model: smollm2-135m shapes, random weights, 1 layers" in stdout
    assert [(r["engine"], r["batch"]) for r in rows] == [(e, b) for b in (1, 2) for e in bench_engines()]
    assert all(r["status"] == "ok" and r["tok_s"] > 0 and r["prefill"] == "synthetic" for r in rows), rows
    state = {(r["engine"], r["batch"]): r["state_mib_per_seq"] for r in rows}
    # the static buffers add the length, the pad counts and each head's pending decay of S: a few bytes
    assert state["hybrid-eager", 1] > 0
    assert state["hybrid-eager", 1] == pytest.approx(state["hybrid-static", 1], rel=1e-3)
    assert state["hybrid-static", 1] == pytest.approx(state["hybrid-static", 2], rel=1e-4)  # per sequence
    assert "hybrid-static" in stdout and "┃ engine" in stdout  # the Rich table


def test_one_failing_engine_loses_no_other_row(tmp_path) -> None:
    """A window without softmax keys cannot run the static path: its row says why, the others still run."""
    _, rows = _run(tmp_path, "--window", "none", "--engines", "hybrid-static", "hybrid-eager", "--prefill", "real")
    static, eager = rows
    assert static["status"].startswith("error: ModelError: static decoding cannot run this model")
    assert "span 0" in static["status"]
    assert eager["status"] == "ok" and eager["prefill"] == "real" and eager["prefill_tok_s"] > 0


def bench_engines() -> tuple[str, ...]:
    return load_benchmark("generation").ENGINES


@pytest.mark.parametrize("chunk", [16, 64])
def test_a_left_padded_prefill_gives_each_rows_own_last_logits(bench, tiny_model_dir, chunk) -> None:
    """--pad-fraction: row b loses round(0.5 T b / (B - 1)) leading tokens to padding; the prefill (in chunks, the
    mask passed as far as each reaches) gives each row the last logits of its real tokens prefilled alone."""
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.decode.cache import make_cache
    from lolcats_cli.core.model.convert import convert_model

    model = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), window_params={"size": 8}).eval()
    ids = torch.randint(1, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    padded, mask = bench.left_padded(ids, 0.5)
    assert mask.sum(dim=1).tolist() == [40, 30, 20]
    assert (padded[mask == 0] == 0).all() and torch.equal(padded[mask == 1], ids[mask == 1])
    got = bench.prefill(model, make_cache(model), padded, chunk, mask)
    for b, n in enumerate((40, 30, 20)):
        alone = bench.prefill(model, make_cache(model), ids[b : b + 1, 40 - n :], chunk)
        torch.testing.assert_close(got[b : b + 1], alone, atol=2e-4, rtol=2e-4)
    assert bench.left_padded(ids, 0.0) == (ids, None)
    with pytest.raises(SystemExit, match="--pad-fraction 1.0: must be at least 0 and below 1"):
        bench.left_padded(ids, 1.0)


def test_the_benchmark_times_left_padded_prompts(tmp_path) -> None:
    _, rows = _run(tmp_path, "--batch-sizes", "2", "--prefill", "real", "--pad-fraction", "0.5",
                   "--engines", "hybrid-static", "hybrid-eager", "softmax-eager")  # fmt: skip
    assert [r["engine"] for r in rows] == ["hybrid-static", "hybrid-eager", "softmax-eager"]
    assert all(r["status"] == "ok" and r["pad_fraction"] == 0.5 and r["prefill_tok_s"] > 0 for r in rows), rows
