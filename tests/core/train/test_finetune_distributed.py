"""Stage 2 (LoRA) over two gloo ranks under torchrun, the frozen weights sharded with FSDP2, against the same
recipe in one process.

What "the same result" means here, from core/train/trainer.py: update ``s`` takes the micro-batches
``s * grad_accum ...`` of one global, seeded order; rank r computes those at positions r, r + 2, ... (a rank
short of one runs a zero-weight batch), each scaled by ``1 / grad_accum``, and the gradients are summed over
the ranks before clipping and AdamW. The LoRA initialisation is seeded with ``finetune.seed``, and nothing random
runs inside a micro-batch (``lora.dropout`` 0, no ``attention.train_window_sizes``). So both runs make the same
updates from the same start on the same data; only the order of the fp32 gradient sums differs (g0 + g1 + g2 in
one process, (g0 + g2) + g1 over two ranks). That reassociation changes a gradient by a few ulps (~1e-7
relative), and AdamW's step, about lr x sign, barely feels it: measured here, the weights differ by at most
1.5e-7 after four steps (weights up to 0.13 in the adapter, 2.2 in the attention). 1e-5 leaves room for other
thread counts and BLAS builds, while any real difference (a rank's micro-batch lost or counted twice,
unsynchronised LoRA weights, an unseeded initialisation) moves the weights by about lr = 3e-3 per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lolcats_cli.core.runs.workspace import open_run
from lolcats_cli.core.train.finetune import run_finetune
from lolcats_cli.core.train.transfer import run_transfer
from tiny_recipes import tiny_recipe  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")
# grad_accum 3 over 2 ranks: rank 0 takes micro-batches 0 and 2, rank 1 takes 1 and a zero-weight one.
# train_attention: the feature maps train too, so both kinds of trainables (LoRA, attention) are summed.
FINETUNE = ["finetune.max_steps=4", "finetune.grad_accum=3", "finetune.lr=0.003", "finetune.eval_every=2",
            "finetune.train_attention=true"]
TOL = 1e-5  # see the module docstring


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = tmp_path_factory.mktemp("ft-dist") / "transfer"
    run_transfer(tiny_recipe(tiny_model_dir, "transfer.max_steps=2", "transfer.eval_every=2"), run, device="cpu")
    return run


def _torchrun_finetune(transfer_run: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lolcats_cli", "finetune", str(transfer_run), *FINETUNE, "--output", str(out), "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_finetune_over_two_gloo_ranks_matches_one_process(transfer_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_finetune(transfer_run, one, FINETUNE, device="cpu")
    proc = _torchrun_finetune(transfer_run, two)
    assert proc.stdout.count("held-out perplexity") == 1  # rank 0 reports, once

    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert (m2["steps"], m2["tokens_seen"], m2["best_step"]) == (m1["steps"], m1["tokens_seen"], m1["best_step"])
    assert m1["steps"] == 4 and m1["tokens_seen"] == 4 * 3 * 96
    assert [h["step"] for h in m2["eval_history"]] == [h["step"] for h in m1["eval_history"]] == [0, 2, 4]
    assert [h["loss"] for h in m2["eval_history"]] == pytest.approx([h["loss"] for h in m1["eval_history"]], rel=TOL)
    assert m2["heldout_ppl_before"] == pytest.approx(m1["heldout_ppl_before"], rel=TOL)
    assert m2["heldout_ppl_after"] == pytest.approx(m1["heldout_ppl_after"], rel=TOL)
    assert m1["heldout_ppl_after"] < m1["heldout_ppl_before"]  # it trained: the runs agree on something real

    # the saved adapter: the full LoRA weights, the same keys, shapes and values as one process writes
    a1, a2 = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (one, two))
    assert a1.keys() == a2.keys() and any(".lora_B." in k for k in a1)
    for key in a1:
        assert a2[key].shape == a1[key].shape, key
        torch.testing.assert_close(a2[key], a1[key], rtol=0, atol=TOL)
    assert any(a1[k].abs().max() > 100 * TOL for k in a1 if ".lora_B." in k)  # B starts at zero: it moved
    c1, c2 = (json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (one, two))
    c1["target_modules"], c2["target_modules"] = sorted(c1["target_modules"]), sorted(c2["target_modules"])  # a set
    assert c1 == c2
    w1, w2 = (load_file(run / "attention.safetensors") for run in (one, two))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=TOL)

    # and it loads exactly like a one-process run's (peft adapter merged into the weights)
    _, tuned_two, _ = open_run(two, "cpu")
    _, tuned_one, _ = open_run(one, "cpu")
    ids = torch.arange(1, 60).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(tuned_two(input_ids=ids).logits, tuned_one(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
