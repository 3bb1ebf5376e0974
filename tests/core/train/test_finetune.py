"""Stage 2 (LoRA) on a tiny transfer run: real training, peft's adapter format, resume and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
from lolcats_cli.core.runs.workspace import open_run
from lolcats_cli.core.train.finetune import run_finetune
from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.errors import LolcatsError

SMALL = [
    "data.dataset=pydoc", "data.seq_len=96", "attention.window_params.size=16", "data.holdout=4",
    "data.num_eval_sequences=2", "data.max_samples=40", "transfer.grad_accum=1", "transfer.max_steps=3",
    "transfer.eval_every=3",
]


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_model_dir) -> Path:
    recipe = Recipe.from_dict(apply_overrides(Recipe().to_dict(), [f"model.name={tiny_model_dir}", *SMALL]))
    run = tmp_path_factory.mktemp("ft") / "transfer"
    run_transfer(recipe, run, device="cpu")
    return run


def test_finetune_lowers_heldout_perplexity_and_saves_a_peft_adapter(transfer_run, tmp_path):
    out = tmp_path / "lora"
    result = run_finetune(transfer_run, out, ["finetune.max_steps=6", "finetune.grad_accum=1", "finetune.lr=0.003",
                                               "finetune.eval_every=3"], device="cpu")
    assert result.ppl_after < result.ppl_before
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "finetune" and metrics["heldout_ppl_after"] == pytest.approx(result.ppl_after)

    # The finetune run reopens with the adapter merged and differs from the transfer run alone.
    _, tuned, _ = open_run(out, "cpu")
    _, plain, _ = open_run(transfer_run, "cpu")
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_feature_maps_stay_frozen_unless_asked(transfer_run, tmp_path):
    from safetensors.torch import load_file

    steps = ["finetune.max_steps=2", "finetune.grad_accum=1", "finetune.lr=0.01", "finetune.eval_every=100"]
    run_finetune(transfer_run, tmp_path / "frozen", steps, device="cpu")
    run_finetune(transfer_run, tmp_path / "joint", [*steps, "finetune.train_attention=true"], device="cpu")
    before = load_file(transfer_run / "attention.safetensors")
    frozen = load_file(tmp_path / "frozen" / "attention.safetensors")
    joint = load_file(tmp_path / "joint" / "attention.safetensors")
    assert before.keys() == frozen.keys() == joint.keys()
    for key in before:
        torch.testing.assert_close(frozen[key], before[key], rtol=0, atol=0)
    assert any(not torch.equal(joint[key], before[key]) for key in before)


def test_finetune_needs_a_finished_transfer_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LolcatsError, match="not a finished lolcats run"):
        run_finetune(tmp_path / "empty", tmp_path / "out", device="cpu")


def test_a_finetune_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way(transfer_run, tmp_path, caplog):
    from lolcats_cli.errors import DataError

    (tmp_path / "not-a-run").mkdir()
    with caplog.at_level("WARNING", logger="lolcats_cli"), pytest.raises(LolcatsError, match="not a finished lolcats run"):
        run_finetune(tmp_path / "not-a-run", device="cpu")
    assert not (tmp_path / "not-a-run-finetune").exists()  # the default output the failed run made is gone
    assert f"removed {tmp_path / 'not-a-run-finetune'}" in caplog.text

    out = tmp_path / "lora"
    with pytest.raises(DataError):  # fails after writing its recipe, source.json and attention weights
        run_finetune(transfer_run, out, [f"data.dataset={tmp_path / 'missing.jsonl'}"], device="cpu")
    assert not out.exists()
    steps = ["finetune.max_steps=1", "finetune.grad_accum=1", "finetune.eval_every=100"]
    assert run_finetune(transfer_run, out, steps, device="cpu").steps == 1  # the retry is not refused


def test_ctrl_c_during_finetune_says_the_step_the_checkpoint_and_the_command_that_resumes(
    transfer_run, tmp_path, ctrl_c_cli
):
    out = tmp_path / "lora"
    args = ["finetune", str(transfer_run), "--output", str(out), "--device", "cpu", "finetune.grad_accum=1",
            "finetune.max_steps=60", "finetune.eval_every=1000", "finetune.save_every=2"]
    ctrl_c_cli(args, out, 60, "LoRA finetune", f"lolcats finetune {transfer_run} --output {out} --resume --device cpu")


def test_distill_kl_is_the_masked_mean_of_next_token_kl() -> None:
    from lolcats_cli.core.train.finetune import distill_kl

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 11, generator=gen), torch.randn(2, 6, 11, generator=gen)
    assert distill_kl(teacher, teacher, None).abs() < 1e-6
    p, logq = teacher[:, :-1].softmax(-1), student[:, :-1].log_softmax(-1)
    want = torch.nn.functional.kl_div(logq, p, reduction="none").sum(-1)  # (2, 5)
    torch.testing.assert_close(distill_kl(student, teacher, None), want.mean())
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = 1  # only positions 2..4 of row 0 predict a label
    torch.testing.assert_close(distill_kl(student, teacher, labels), want[0, 2:5].mean())
    moved = student.clone()
    moved[1] += torch.randn(6, 11, generator=gen)  # a fully masked row does not count
    torch.testing.assert_close(distill_kl(moved, teacher, labels), distill_kl(student, teacher, labels))


def test_kl_objective_moves_the_student_towards_its_teacher(transfer_run, tmp_path):
    from lolcats_cli.core.data.data import build_datasets
    from lolcats_cli.core.train.finetune import heldout_kl

    out = tmp_path / "kl"
    steps = ["finetune.max_steps=6", "finetune.grad_accum=1", "finetune.lr=1e-4", "finetune.eval_every=3",
             "finetune.objective=kl"]
    run_finetune(transfer_run, out, steps, device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["eval_history"]
    assert metrics["objective"] == "kl" and [h["loss"] for h in history] == [h["kl"] for h in history]
    assert all("perplexity" in h for h in history)

    # the saved run (adapter kept separate, so the teacher view can switch it off) reproduces the best value
    recipe, after, tokenizer = open_run(out, "cpu", merge_lora=False)
    _, held = build_datasets(recipe.data, tokenizer)
    ids = held.input_ids[: recipe.data.num_eval_sequences]
    best = min(h["kl"] for h in history)
    assert heldout_kl(after, ids, held.labels[: len(ids)], torch.device("cpu")) == pytest.approx(best, rel=1e-4)
    with pytest.raises(LolcatsError, match="finetune.objective"):
        run_finetune(transfer_run, tmp_path / "bad", ["finetune.objective=mse"], device="cpu")


def test_kl_gradient_moves_lora_towards_the_teacher(transfer_run):
    from peft import get_peft_model

    from lolcats_cli.core.data.data import build_datasets
    from lolcats_cli.core.model.convert import teacher_view
    from lolcats_cli.core.train.finetune import distill_kl, lora_config

    recipe, model, tokenizer = open_run(transfer_run, "cpu", mode="student")
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, lora_config(recipe))
    ids = build_datasets(recipe.data, tokenizer)[0].input_ids[:2]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = []
    for _ in range(3):
        with torch.no_grad(), teacher_view(model):
            teacher = model(input_ids=ids, use_cache=False).logits
        loss = distill_kl(model(input_ids=ids, use_cache=False).logits, teacher, None)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 0 and losses[2] < losses[1] < losses[0]
    with torch.no_grad(), teacher_view(model):  # the teacher is the original model: LoRA off, softmax attention
        again = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(again, teacher)
