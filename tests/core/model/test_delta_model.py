"""``attention.delta_rule`` in a converted model: the layers run the delta kernel (and refuse another), the write
strength starts at 0.5 and trains, cached decoding equals the full forward, and a delta-rule run goes through
transfer, finetune, eval, both exports and reload with the same outputs; what the delta state cannot do yet
(static decoding, left padding, the attention cross-entropy) is refused naming the way out."""

from __future__ import annotations

import json

import pytest
import torch

from lolcats_cli.core.model import convert as cv
from lolcats_cli.core.train.checkpoint import load_tensors
from lolcats_cli.core.eval.evaluate import evaluate_run
from lolcats_cli.core.export.export import export_run, load_adapter_export
from lolcats_cli.core.train.finetune import run_finetune
from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
from lolcats_cli.core.decode.static_decode import static_decode_problem
from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.core.runs.workspace import open_run
from lolcats_cli.errors import ConfigError, ModelError
from lolcats_cli.hf_compat import DynamicCache, cache_kwarg
from lolcats_cli.kernels.delta import DeltaKernel

from tiny_converted import converted_model  # tests/ is on sys.path (rootdir conftest)
from tiny_recipes import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _open(delta_rule: bool = True, seed: int = 0):
    model = converted_model(sinks=2, gate=True, size=4, seed=seed, decay=True, delta_rule=delta_rule)
    with torch.no_grad():  # open the gate and vary beta, so the linear branch matters at these lengths
        for name, p in cv.attention_parameters(model).items():
            if name.endswith("linear_logits"):
                p.add_(1.6)
            elif name.endswith("beta_weight"):
                p.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    return model


def test_layers_run_the_delta_kernel_and_the_state_changes_the_model() -> None:
    model = _open()
    layer = cv.linearized_layers(model)[0][1]
    assert isinstance(layer.kernel, DeltaKernel) and "delta_rule=True" in repr(layer)
    assert cv.describe(model)["delta_rule"] is True
    fresh = cv.linearized_layers(converted_model(sinks=2, gate=True, delta_rule=True))[0][1]
    k = torch.randn(1, 4, 5, 16)
    assert torch.allclose(fresh.write_strength(k), torch.full((1, 4, 5), 0.5))  # beta starts at 0.5
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - _open(False)(ids, use_cache=False).logits).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="uses the delta rule: kernel 'chunked' does not implement it"):
        layer.kernel = "chunked"
    layer.kernel = DeltaKernel(reference=True)
    assert layer.kernel.name == "delta-naive"


def test_the_write_strength_trains_in_stage_1() -> None:
    model = _open()
    params = cv.freeze_for_transfer(model)
    cv.set_mode(model, "transfer")
    ids = torch.randint(1, 128, (2, 48), generator=torch.Generator().manual_seed(5))
    model.model(input_ids=ids, use_cache=False)
    loss = sum(m.transfer_loss for _, m in cv.linearized_layers(model))
    loss.backward()
    betas = [p for name, p in cv.attention_parameters(model).items() if "beta_" in name]
    assert len(betas) == 4 and all(any(b is p for p in params) for b in betas)
    assert all(b.grad is not None and b.grad.abs().max() > 0 for b in betas)


def test_cached_decoding_equals_the_full_forward() -> None:
    model = _open()
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, outs = DynamicCache(), []
        for a, b in [(0, 30), (30, 31), (31, 33), (33, 70)]:
            outs.append(model(ids[:, a:b], use_cache=True, **{cache_kwarg(model): cache}).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)
    assert "delta-rule state" in static_decode_problem(model)
    padded, mask = ids[:, :20].clone(), torch.ones(1, 20, dtype=torch.long)
    padded[:, :3], mask[:, :3] = 0, 0
    with torch.no_grad(), pytest.raises(ModelError, match="does not decode left-padded batches yet"):
        model(padded, attention_mask=mask, use_cache=True, **{cache_kwarg(model): DynamicCache()})


def test_the_attention_cross_entropy_is_refused() -> None:
    with pytest.raises(ConfigError, match="transfer.attn_ce_weight: the attention cross-entropy needs the additive"):
        Recipe.from_dict(apply_overrides(Recipe().to_dict(), ["attention.delta_rule=true", "transfer.attn_ce_weight=1"]))


def test_a_delta_rule_run_trains_exports_and_reloads(tiny_model_dir, tmp_path) -> None:
    run = tmp_path / "transfer"
    run_transfer(tiny_recipe(tiny_model_dir, "attention.delta_rule=true", "attention.linear_gate=true",
                             "transfer.max_steps=4"), run, device="cpu")  # fmt: skip
    saved = load_tensors(run / "attention.safetensors")
    assert {"model.layers.0.self_attn.beta_weight", "model.layers.1.self_attn.beta_bias"} <= set(saved)
    tuned = tmp_path / "finetune"
    run_finetune(run, tuned, ["finetune.max_steps=2", "finetune.eval_every=2"], device="cpu")
    _, tuned_model, _ = open_run(tuned, "cpu")
    report = evaluate_run(tuned, contexts=(64,), passkey_lengths=(), device="cpu", max_tokens=256,
                          rows=["linearized", "linear_zeroed"])  # fmt: skip
    rows = report.to_dict()["rows"]
    assert all(1 < rows[r]["perplexity"]["64"] < 1e4 for r in ("linearized", "linear_zeroed"))

    ids = torch.randint(3, 400, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = tuned_model(ids, use_cache=False).logits
    adapter = export_run(tuned, tmp_path / "adapter", "adapter")
    assert json.loads((adapter / "lolcats_config.json").read_text())["attention"]["delta_rule"] is True
    with torch.no_grad():
        torch.testing.assert_close(load_adapter_export(adapter, device="cpu")(ids, use_cache=False).logits, want,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    hf = export_run(tuned, tmp_path / "hf", "hf")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, want, atol=1e-4, rtol=1e-4)
