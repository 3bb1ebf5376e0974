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

from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
from lolcats_cli.core.train.transfer import TransferObjective, run_transfer
from lolcats_cli.errors import LolcatsError, TrainingError

from conftest import REPO  # tests/ is on sys.path (rootdir conftest)
from tiny_recipes import tiny_recipe


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama whose attention is far from uniform (larger init), so there is something to learn."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("peaky"), tiny_tokenizer, initializer_range=0.25)


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
    from lolcats_cli.core.model.convert import convert_model, freeze_for_transfer, linearized_layers
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


@pytest.mark.parametrize("window, size, seq_len, sinks", [("terrace", 64, 128, 0), ("sliding", 32, 36, 4)])
def test_a_sequence_the_window_covers_entirely_is_refused(tiny_model_dir, tmp_path, window, size, seq_len, sinks):
    from lolcats_cli.errors import ConfigError

    recipe = tiny_recipe(tiny_model_dir, f"attention.window={window}", f"attention.window_params.size={size}",
                         f"attention.window_params.sinks={sinks}", f"data.seq_len={seq_len}")
    with pytest.raises(ConfigError, match=f"data.seq_len={seq_len}: the {window} window .* covers every key"):
        run_transfer(recipe, tmp_path / "never", device="cpu")
    assert not (tmp_path / "never").exists()
    # one key more than the window reaches (past the sinks) is enough to train on
    from lolcats_cli.core.runs.workspace import check_window_fits

    check_window_fits(tiny_recipe(tiny_model_dir, f"attention.window={window}", f"attention.window_params.size={size}",
                                  f"attention.window_params.sinks={sinks}", f"data.seq_len={seq_len + 1}"))


# ------------------------------------------------------------------------------------------------------------
# Interrupted, damaged and failed runs (issue 11, "Runs and models").

class CtrlCAt:
    """A reporter that presses Ctrl-C (raises KeyboardInterrupt, as Python does on SIGINT) right after update
    ``at``, before that step's evaluation and checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def start(self, title, total_steps, done_steps) -> None: ...
    def evaluated(self, info) -> None: ...
    def log(self, message) -> None: ...
    def finish(self) -> None: ...

    def step(self, info) -> None:
        if info.step == self.at:
            raise KeyboardInterrupt


RESUMABLE = ("transfer.max_steps=8", "transfer.eval_every=4")


@pytest.fixture(scope="module")
def uninterrupted(peaky_model_dir, tmp_path_factory) -> Path:
    """The run the interrupted ones below must end exactly like."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_transfer(tiny_recipe(peaky_model_dir, *RESUMABLE), run, device="cpu")
    return run


def _assert_same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "attention.safetensors"), load_file(b / "attention.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["steps"] == mb["steps"] and ma["tokens_seen"] == mb["tokens_seen"]
    assert [r["mse_after"] for r in ma["layers"]] == pytest.approx([r["mse_after"] for r in mb["layers"]], rel=1e-5)


def test_a_run_stopped_before_its_first_evaluation_resumes_from_its_step_0_checkpoint(peaky_model_dir, uninterrupted, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as stop:
        run_transfer(tiny_recipe(peaky_model_dir, *RESUMABLE), run, reporter=CtrlCAt(1), device="cpu")
    run_transfer(None, run, resume=True, device="cpu")  # the step-0 optimizer file (no tensors) reads back
    _assert_same_run(uninterrupted, run)
    # The interruption says where the run stopped and what it can resume from.
    assert (stop.value.step, stop.value.total_steps, stop.value.checkpoint_step) == (1, 8, 0)
    assert stop.value.checkpoint == run / "checkpoints" / "step-00000000"


def test_checkpoints_are_also_written_on_a_time_basis_and_resume_exactly(peaky_model_dir, uninterrupted, tmp_path):
    from lolcats_cli.core.recipe.recipe import TrainConfig

    assert TrainConfig().save_every_minutes == 5.0
    run = tmp_path / "run"
    # Every update takes longer than 1e-9 minutes: a checkpoint after each, although eval_every is 4.
    recipe = tiny_recipe(peaky_model_dir, *RESUMABLE, "transfer.save_every_minutes=1e-9")
    with pytest.raises(KeyboardInterrupt) as stop:
        run_transfer(recipe, run, reporter=CtrlCAt(7), device="cpu")
    assert stop.value.checkpoint_step == 6
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 6
    run_transfer(None, run, resume=True, device="cpu")
    _assert_same_run(uninterrupted, run)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(peaky_model_dir, uninterrupted, tmp_path, caplog):
    run = tmp_path / "run"
    run_transfer(tiny_recipe(peaky_model_dir, *RESUMABLE, "transfer.save_every=1"), run, device="cpu")
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000007", "step-00000008"]  # the previous is kept

    bad = ckpt / "step-00000008" / "optimizer.safetensors"
    bad.write_bytes(bad.read_bytes()[:5])  # truncated: safetensors says "invalid header length"
    with caplog.at_level("WARNING", logger="lolcats_cli"):
        run_transfer(None, run, resume=True, device="cpu")
    assert str(bad) in caplog.text and "falling back" in caplog.text and "step 7" in caplog.text
    _assert_same_run(uninterrupted, run)  # step 8 was done again from step 7

    caplog.clear()
    pointer = ckpt / "latest.json"
    pointer.write_text(pointer.read_text()[:10])  # truncated JSON
    with caplog.at_level("WARNING", logger="lolcats_cli"):
        run_transfer(None, run, resume=True, device="cpu")
    assert str(pointer) in caplog.text and "unreadable" in caplog.text
    _assert_same_run(uninterrupted, run)

    for folder in ckpt.glob("step-*"):
        (folder / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(TrainingError, match="no readable checkpoint") as err:
        run_transfer(None, run, resume=True, device="cpu")
    assert "trainable.safetensors" in str(err.value) and "--overwrite" in str(err.value)


DISK_FULL_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from tiny_recipes import tiny_recipe
from lolcats_cli.core.progress import NullReporter
from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.errors import TrainingError

disk = Path(sys.argv[1])

def fill_the_disk():
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError:
            pass

class FillTheDiskAfterStep3(NullReporter):
    def step(self, info):
        if info.step == 3:
            fill_the_disk()

class FillTheDiskAfterTraining(NullReporter):  # then the final attention.safetensors cannot be written
    def finish(self):
        fill_the_disk()

out = {{}}
recipe = tiny_recipe(Path({model!r}), "transfer.max_steps=6", "transfer.eval_every=100", "transfer.save_every=1")
try:
    run_transfer(recipe, disk / "run", reporter=FillTheDiskAfterStep3(), device="cpu")
except TrainingError as e:
    out.update(error=e.message, hint=e.hint)
    out["latest"] = json.loads((disk / "run" / "checkpoints" / "latest.json").read_text())["step"]
    (disk / "filler").unlink()
try:
    run_transfer(None, disk / "run", resume=True, reporter=FillTheDiskAfterTraining(), device="cpu")
except TrainingError as e:
    out.update(final_error=e.message, final_hint=e.hint)
    (disk / "filler").unlink()
out["resumed"] = run_transfer(None, disk / "run", resume=True, device="cpu").steps
print(json.dumps(out))
"""


def test_a_full_disk_names_the_folder_and_keeps_the_last_checkpoint(peaky_model_dir, tmp_path):
    """A real ENOSPC: the run directory is on a small tmpfs (mounted in a private namespace) that fills up."""
    import shutil

    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_SCRIPT.format(tests=str(REPO / "tests"), model=str(peaky_model_dir)))
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    mount = f"mount -t tmpfs -o size=8m tmpfs {disk} && exec {sys.executable} {script} {disk}"
    import lolcats_cli

    code = str(Path(lolcats_cli.__file__).parents[1])  # the script imports the lolcats_cli under test
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([code, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", mount], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == f"the disk is full: cannot write the checkpoint of step 3 in {disk / 'run' / 'checkpoints'}"
    assert "the last good checkpoint (step 2" in out["hint"] and "--resume" in out["hint"]
    assert out["latest"] == 2
    assert out["final_error"] == f"the disk is full: cannot write in {disk / 'run'}"
    assert "checkpoint is kept" in out["final_hint"] and "--resume" in out["final_hint"]
    assert out["resumed"] == 6


def test_ctrl_c_says_the_step_the_checkpoint_and_the_command_that_resumes(peaky_model_dir, tmp_path, ctrl_c_cli):
    run = tmp_path / "run"
    common = ["--model", str(peaky_model_dir), "--device", "cpu", "data.seq_len=96", "attention.window_params.size=16",
              "data.holdout=4", "data.num_eval_sequences=2", "data.max_samples=40", "transfer.grad_accum=1",
              "transfer.max_steps=80", "transfer.eval_every=1000", "transfer.save_every=2"]
    ctrl_c_cli(["transfer", *common, "--output", str(run)], run, 80, "attention transfer",
               f"lolcats transfer --output {run} --resume --device cpu")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way(peaky_model_dir, tmp_path, caplog):
    from lolcats_cli.errors import DataError

    broken = ("data.dataset=" + str(tmp_path / "missing.jsonl"),)
    run = tmp_path / "new"
    with caplog.at_level("WARNING", logger="lolcats_cli"), pytest.raises(DataError):
        run_transfer(tiny_recipe(peaky_model_dir, *broken), run, device="cpu")
    assert not run.exists()  # the run made it, so the run removed it
    assert f"removed {run}" in caplog.text

    mine = tmp_path / "mine"  # a folder the user made: it stays, and so does what the user put in it
    mine.mkdir()
    with pytest.raises(DataError):
        run_transfer(tiny_recipe(peaky_model_dir, *broken), mine, device="cpu")
    assert mine.is_dir() and list(mine.iterdir()) == []
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(LolcatsError, match="already exists"):
        run_transfer(tiny_recipe(peaky_model_dir, *broken), mine, device="cpu")
    assert (mine / "notes.txt").read_text() == "mine"

    result = run_transfer(tiny_recipe(peaky_model_dir, "transfer.max_steps=2"), run, device="cpu")  # the retry
    assert result.steps == 2


def test_a_folder_left_by_a_run_killed_before_its_first_checkpoint_is_reused(peaky_model_dir, tmp_path, caplog):
    from lolcats_cli.core.runs.workspace import record_run

    recipe = tiny_recipe(peaky_model_dir, "transfer.max_steps=2")
    killed = tmp_path / "killed"
    killed.mkdir()
    record_run(killed, recipe)  # what a run killed (kill -9) while loading its model leaves
    (killed / ".versions.json.x1y2.tmp").write_text("{")  # and the temporary file of a write it was doing
    with caplog.at_level("WARNING", logger="lolcats_cli"):
        assert run_transfer(recipe, killed, device="cpu").steps == 2
    assert f"reusing {killed}" in caplog.text
    assert not list(killed.glob("*.tmp"))

    again = tmp_path / "again"
    again.mkdir()
    record_run(again, recipe)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lolcats_cli"):  # --resume starts it from step 0
        assert run_transfer(None, again, resume=True, device="cpu").steps == 2
    assert "holds no checkpoint yet" in caplog.text


@pytest.mark.parametrize("ce", [False, True], ids=["mse", "mse+attention-ce"])
def test_the_per_layer_backward_gives_the_gradients_of_one_backward_and_keeps_no_graph(tiny_model_dir, ce):
    """TransferObjective.backward runs each layer's backward during the forward (what stage 1's trainer calls):
    the same loss and the same gradients as ``(scale * loss()).backward()``, and no layer keeps its graph."""
    from lolcats_cli.core.model.convert import convert_model, freeze_for_transfer, linearized_layers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convert_model(model, mode="transfer", decay=True)
    params = freeze_for_transfer(model)
    layers = linearized_layers(model)
    assert len(layers) >= 2
    for _, layer in layers:
        layer.attn_ce_queries = 8 if ce else 0
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    objective = TransferObjective(model, ids, torch.device("cpu"), mse_weight=1.0 if ce else 1000.0,
                                  ce_weight=1.0 if ce else 0.0)  # both terms matter to the gradients
    runs = []
    for per_layer in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the attention CE samples its query rows
        if per_layer:
            loss = objective.backward(ids, None, 0.25)
            assert not loss.requires_grad
            assert all(m.transfer_loss.grad_fn is None and m.eager_backward is None for _, m in layers)
        else:
            loss = objective.loss(ids)
            (0.25 * loss).backward()
        runs.append((loss.item(), [p.grad.clone() for p in params]))
    (joint, g_joint), (eager, g_eager) = runs
    assert eager == pytest.approx(joint, rel=1e-6)
    largest = max(float(g.abs().max()) for g in g_joint)  # small here (maps at their identity start): relative
    assert largest > 0
    for a, b in zip(g_eager, g_joint):
        assert (a - b).abs().max() <= 1e-5 * max(float(b.abs().max()), 1e-3 * largest)


def test_the_per_layer_backward_holds_one_layer_s_saved_tensors_at_a_time():
    """What the per-layer backward is for: the peak bytes of tensors saved for backward (counted through autograd's
    saved-tensor hooks, alive until their graph is freed) are one layer's, against every layer's for one backward
    after the forward: 4 layers, a quarter."""
    import transformers

    from lolcats_cli.core.model.convert import convert_model, freeze_for_transfer

    live = {"now": 0, "peak": 0}

    class Saved:  # what autograd keeps for one saved tensor; counted from packing until the graph drops it
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.n = t, t.numel() * t.element_size()
            live["now"] += self.n
            live["peak"] = max(live["peak"], live["now"])

        def __del__(self) -> None:
            live["now"] -= self.n

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    convert_model(model, mode="transfer")
    freeze_for_transfer(model)
    ids = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))
    objective = TransferObjective(model, ids, torch.device("cpu"), mse_weight=1.0)
    peaks = {}
    for per_layer in (False, True):
        live.update(now=0, peak=0)
        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
            if per_layer:
                objective.backward(ids, None, 1.0)
            else:
                objective.loss(ids).backward()
        assert live["now"] == 0  # every graph was freed
        peaks[per_layer] = live["peak"]
    assert 0 < peaks[True] <= 0.3 * peaks[False], peaks
