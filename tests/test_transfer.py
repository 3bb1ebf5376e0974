"""Stage 1 end to end on tiny random models (real training, real files), plus a few real steps on SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lolcats_cli.core.recipe import Recipe, apply_overrides
from lolcats_cli.core.transfer import TransferObjective, run_transfer
from lolcats_cli.errors import LolcatsError, TrainingError


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama whose attention is far from uniform (larger init), so there is something to learn."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("peaky"), tiny_tokenizer, initializer_range=0.25)


def tiny_recipe(model_dir: Path, *extra: str) -> Recipe:
    overrides = [
        f"model.name={model_dir}",
        "data.dataset=pydoc",
        "data.seq_len=96",
        "attention.window_params.size=16",
        "data.holdout=4",
        "data.num_eval_sequences=2",
        "data.max_samples=40",
        "transfer.batch_size=1",
        "transfer.grad_accum=2",
        "transfer.max_steps=6",
        "transfer.eval_every=3",
        "transfer.lr=0.01",
        *extra,
    ]
    return Recipe.from_dict(apply_overrides(Recipe().to_dict(), overrides))


def test_transfer_trains_every_layer_and_writes_a_self_describing_run(peaky_model_dir, tmp_path):
    run = tmp_path / "run"
    result = run_transfer(tiny_recipe(peaky_model_dir), run, device="cpu")

    for name in ("recipe.resolved.yaml", "versions.json", "attention.safetensors", "metrics.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["layer"] for row in metrics["layers"]] == [0, 1]
    for row in metrics["layers"]:
        assert row["mse_after"] < row["mse_before"], row
    assert metrics["tokens_seen"] == result.tokens_seen == 6 * 2 * 96
    assert metrics["wall_time_s"] > 0
    versions = json.loads((run / "versions.json").read_text())
    assert {"torch", "transformers"} <= set(versions)
    assert result.steps == 6


def test_existing_output_directory_is_refused_unless_resume_or_overwrite(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("user data")
    with pytest.raises(LolcatsError, match="already exists"):
        run_transfer(tiny_recipe(tiny_model_dir), run, device="cpu")
    with pytest.raises(LolcatsError, match="not a lolcats run directory"):
        run_transfer(tiny_recipe(tiny_model_dir), run, overwrite=True, device="cpu")
    assert (run / "precious.txt").read_text() == "user data"


def test_non_finite_loss_names_the_layer(tiny_model_dir):
    from lolcats_cli.core.convert import convert_model, freeze_for_transfer, linearized_layers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convert_model(model, mode="transfer")
    freeze_for_transfer(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 80))
    objective = TransferObjective(model, ids, torch.device("cpu"), mse_weight=1000.0)
    assert torch.isfinite(objective.loss(ids))
    layer = dict(linearized_layers(model))[1]
    with torch.no_grad():
        next(layer.feature_map_q.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="layer 1"):
        objective.loss(ids)


def _cli(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "lolcats_cli", *args]


def test_killed_run_resumes_to_the_same_result(peaky_model_dir, tmp_path):
    """Kill a real `lolcats transfer` process mid-run, resume it, and compare with an uninterrupted run."""
    from safetensors.torch import load_file

    common = [
        "transfer", "--model", str(peaky_model_dir), "--device", "cpu",
        "data.seq_len=96", "attention.window_params.size=16", "data.holdout=4", "data.num_eval_sequences=2",
        "data.max_samples=40", "transfer.grad_accum=2", "transfer.max_steps=14", "transfer.eval_every=4", "transfer.save_every=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_cli(*common, "--output", str(full), cwd=tmp_path), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--output", str(killed), cwd=tmp_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if pointer.exists() and json.loads(pointer.read_text())["step"] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(_cli("transfer", "--output", str(killed), "--resume", "--device", "cpu", cwd=tmp_path),
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(full / "attention.safetensors"), load_file(killed / "attention.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert ma["steps"] == mb["steps"] == 14 and ma["tokens_seen"] == mb["tokens_seen"]
    assert [r["mse_after"] for r in ma["layers"]] == pytest.approx([r["mse_after"] for r in mb["layers"]], rel=1e-5)


def test_cli_refuses_an_existing_output_with_one_clear_error(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "file").write_text("x")
    proc = subprocess.run(_cli("transfer", "--model", str(tiny_model_dir), "--output", str(out), cwd=tmp_path),
                          capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 1
    assert "already exists" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_few_real_steps_on_smollm2(smollm2_gguf, tmp_path):
    recipe = Recipe.from_dict(apply_overrides(Recipe().to_dict(), [
        "model.name=smollm2-135m", "data.dataset=pydoc", "data.seq_len=256", "data.holdout=2",
        "data.num_eval_sequences=1", "data.max_samples=20", "transfer.grad_accum=1", "transfer.max_steps=4",
        "transfer.eval_every=4",
    ]))
    result = run_transfer(recipe, tmp_path / "smol", device="cpu")
    assert len(result.layers) == 30
    improved = sum(r["mse_after"] < r["mse_before"] for r in result.layers)
    assert improved >= 25, result.layers


def test_bad_plugin_settings_fail_before_anything_is_loaded_or_written(tiny_model_dir, tmp_path):
    from lolcats_cli.errors import ConfigError

    recipe = tiny_recipe(tiny_model_dir, "attention.window_params.size=0", "attention.feature_map=hedgehg")
    with pytest.raises(ConfigError) as err:
        run_transfer(recipe, tmp_path / "never", device="cpu")
    assert len(err.value.errors) == 2
    assert "did you mean 'hedgehog'" in err.value.errors[0]
    assert err.value.errors[1].startswith("attention.window_params.size:")
    assert not (tmp_path / "never").exists()
