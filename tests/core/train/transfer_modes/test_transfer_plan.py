"""`lolcats transfer --dry-run` (issue 14): the plan of a recipe from the model's shape alone, and the CLI's
distributed options."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lolcats_cli.core.recipe.recipe import load_recipe
from lolcats_cli.core.train.transfer_modes.plan import KNOWN_SHAPES, Hardware, plan_transfer

EIGHT_H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", 8, 80 * 10**9, 700e12)


def test_the_405b_recipe_plans_block_wise_with_the_disk_formula_and_no_weights(tmp_path):
    recipe = load_recipe("llama-3.1-405b")  # the hub is unreachable: the shape comes from the built-in table
    plan = plan_transfer(recipe, output=tmp_path, hardware=EIGHT_H100)
    assert plan.shape == KNOWN_SHAPES["meta-llama/Llama-3.1-405B"]
    assert 400e9 < plan.shape.params < 410e9  # 405B parameters from the shape alone
    assert (plan.mode, plan.processes) == ("blockwise", 8)
    tokens = 10_000_000 + 200 * 1024  # one epoch of alpaca-cleaned (about 10M tokens) + the held-out sequences
    assert plan.disk["block_inputs"] == 2 * tokens * 16384 * 14
    assert plan.disk["formula"] == f"2 bytes x {tokens:,} tokens x 16384 hidden x 14 blocks"
    assert plan.memory["weights"] == plan.shape.params * 2  # bf16 on CUDA
    assert any(p.startswith("memory:") for p in plan.problems)  # every rank holds the whole model today


def test_the_70b_recipe_is_sharded_over_eight_gpus_and_does_not_fit_one(tmp_path):
    recipe = load_recipe("llama-3.1-70b")
    plan = plan_transfer(recipe, output=tmp_path, hardware=EIGHT_H100)
    assert plan.mode == "fsdp" and plan.processes == 8 and plan.disk["block_inputs"] == 0
    assert plan.shape.params * 2 // 8 < plan.memory["weights"] < plan.shape.params * 2 // 7
    assert plan.problems == []
    alone = plan_transfer(recipe, processes=1, output=tmp_path, hardware=EIGHT_H100)
    assert alone.mode == "joint" and alone.memory["weights"] == plan.shape.params * 2 > EIGHT_H100.memory
    assert any("try --gpus 8" in p for p in alone.problems)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lolcats_cli", "transfer", *args], capture_output=True, text=True, env=env)


def test_dry_run_of_a_local_model_reads_its_config_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    proc = _cli("--model", str(tiny_model_dir), "--output", str(out), "--dry-run", "--block-size", "1", "--json",
                "data.seq_len=96", "data.max_samples=40")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["shape_source"] == "its config.json" and plan["shape"]["num_layers"] == 2
    assert plan["mode"] == "blockwise" and plan["disk"]["formula"].endswith("x 64 hidden x 2 blocks")
    assert not out.exists()


def test_gpus_on_a_machine_without_enough_gpus_is_one_clear_error(tiny_model_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    proc = _cli("--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--gpus", "2")
    assert proc.returncode == 2
    assert "--gpus 2: this machine has 0 CUDA GPUs" in proc.stderr and "torchrun --nproc-per-node" in proc.stderr
    assert "Traceback" not in proc.stderr
