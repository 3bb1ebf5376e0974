"""benchmarks/generation.py: model-shape presets, and a prefill that computes the last position's logits only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("generation_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    from lolcats_cli.core.cache import make_cache
    from lolcats_cli.core.convert import convert_model

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


def test_the_benchmark_runs_a_preset(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "smollm2-135m", "--layers", "1", "--contexts", "24", "--steps", "1",
         "--warmup", "0", "--prefill-chunk", "16", "--threads", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model: smollm2-135m shapes, random weights, 1 layers" in done.stdout
    assert done.stdout.strip().splitlines()[-1].split()[0] == "24"
