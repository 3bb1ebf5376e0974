"""Block-wise attention transfer (issue 14) on tiny random Llamas: it matches joint transfer with one block,
stores raw residual inputs, resumes at the unfinished block, refuses a too-small disk with the numbers, and
spreads its blocks over two gloo ranks (torchrun) with the same result as one rank. Joint transfer over two
ranks (FSDP2) matches joint transfer in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.errors import TrainingError
from tiny_recipes import tiny_recipe  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS_OF_ONE = ("transfer.block_size=1", "transfer.block_cache_dtype=float32", "transfer.max_steps=4",
                 "transfer.eval_every=2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny 2-layer random Llama with peaky attention (larger init), so there is something to learn."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("peaky-blocks"), tiny_tokenizer, initializer_range=0.25)


@pytest.fixture(scope="module")
def blocks_of_one(model_dir, tmp_path_factory) -> Path:
    """An uninterrupted one-process block-wise run with one layer per block."""
    run = tmp_path_factory.mktemp("blocks") / "run"
    run_transfer(tiny_recipe(model_dir, *BLOCKS_OF_ONE), run, device="cpu")
    return run


def _same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = load_file(a / "attention.safetensors"), load_file(b / "attention.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol)


def test_one_block_of_every_layer_matches_joint_transfer(model_dir, tmp_path):
    common = ("transfer.max_steps=4", "transfer.eval_every=2")
    joint = run_transfer(tiny_recipe(model_dir, *common), tmp_path / "joint", device="cpu")
    block = run_transfer(tiny_recipe(model_dir, *common, "transfer.block_size=2", "transfer.block_cache_dtype=float32"),
                         tmp_path / "block", device="cpu")
    _same_weights(tmp_path / "joint", tmp_path / "block")
    assert [r["mse_after"] for r in block.layers] == pytest.approx([r["mse_after"] for r in joint.layers], rel=1e-5)
    assert [r["mse_before"] for r in block.layers] == pytest.approx([r["mse_before"] for r in joint.layers], rel=1e-5)
    assert (block.mode, block.steps, block.tokens_seen) == ("blockwise", joint.steps, joint.tokens_seen)
    metrics = json.loads((tmp_path / "block" / "metrics.json").read_text())
    assert [b["block"] for b in metrics["blocks"]] == ["block-000"]
    # the trained blocks' inputs are deleted; their weights, summaries and the manifest stay
    assert not list((tmp_path / "block" / "blocks" / "inputs").glob("*/*.safetensors"))
    manifest = json.loads((tmp_path / "block" / "blocks" / "inputs" / "manifest.json").read_text())
    # 4 steps x grad_accum 2 x batch 1 read 8 training rows: only those were stored, not all of them
    assert manifest["rows"]["train"] == 8 < manifest["of_rows"]["train"]
    assert metrics["block_inputs"]["tokens"] == (8 + manifest["rows"]["heldout"]) * manifest["seq_len"]


def test_the_stored_block_input_is_the_raw_residual_stream(model_dir):
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.model.convert import convert_model
    from lolcats_cli.core.train.transfer_modes.blockwise import teacher_inputs

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # (embeddings, after layer 0, ...)
    convert_model(model, mode="teacher")
    got = teacher_inputs(model, ids, [0, 1], torch.device("cpu"))
    torch.testing.assert_close(got[0], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], hidden[1], rtol=1e-5, atol=1e-6)
    normalised = model.model.layers[1].input_layernorm(hidden[1])
    assert not torch.allclose(got[1], normalised, atol=1e-2)


class InterruptIn:
    """Records every fit's (title, first step) and presses Ctrl-C after update ``at`` of the ``nth`` fit."""

    def __init__(self, nth: int | None = None, at: int = 0) -> None:
        self.nth, self.at, self.starts = nth, at, []

    def start(self, title, total_steps, done_steps) -> None:
        self.starts.append((title, done_steps))

    def step(self, info) -> None:
        if len(self.starts) == self.nth and info.step == self.at:
            raise KeyboardInterrupt

    def evaluated(self, info) -> None: ...
    def log(self, message) -> None: ...
    def finish(self) -> None: ...


def test_a_killed_run_resumes_at_the_unfinished_block(model_dir, blocks_of_one, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as stop:
        run_transfer(tiny_recipe(model_dir, *BLOCKS_OF_ONE, "transfer.save_every=1"), run,
                     reporter=InterruptIn(nth=2, at=3), device="cpu")
    assert "block 2 (layer 1)" in stop.value.title and stop.value.checkpoint_step == 2
    first = (run / "blocks" / "block-000.safetensors").stat().st_mtime_ns
    assert not (run / "blocks" / "block-001.safetensors").exists()

    again = InterruptIn()
    result = run_transfer(None, run, resume=True, reporter=again, device="cpu")
    assert [(t.split(" (")[0], step) for t, step in again.starts] == [("attention transfer, block 2", 2)]
    assert (run / "blocks" / "block-000.safetensors").stat().st_mtime_ns == first  # block 1 was not redone
    _same_weights(blocks_of_one, run)
    ref = json.loads((blocks_of_one / "metrics.json").read_text())["layers"]
    assert [r["mse_after"] for r in result.layers] == pytest.approx([r["mse_after"] for r in ref], rel=1e-5)


class StopAfterFirstShard(InterruptIn):
    """Records the log lines; presses Ctrl-C once the teacher pass has stored its first shard (if ``stop``)."""

    def __init__(self, stop: bool) -> None:
        super().__init__()
        self.stop, self.lines = stop, []

    def log(self, message) -> None:
        self.lines.append(message)
        if self.stop and message.startswith("teacher pass"):
            raise KeyboardInterrupt


def test_a_run_killed_in_the_teacher_pass_keeps_the_shards_it_stored(model_dir, blocks_of_one, tmp_path, monkeypatch):
    from lolcats_cli.core.train.transfer_modes import block_cache

    monkeypatch.setattr(block_cache, "SHARD_BYTES", 2 * 96 * 64 * 4)  # 2 fp32 rows of 96 x 64 per shard file
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_transfer(tiny_recipe(model_dir, *BLOCKS_OF_ONE), run, reporter=StopAfterFirstShard(True), device="cpu")
    inputs = run / "blocks" / "inputs"
    assert sorted(p.name for p in inputs.glob("*/*.safetensors")) == ["block-000-00000.safetensors",
                                                                      "block-001-00000.safetensors"]
    assert not (inputs / "manifest.json").exists()

    again = StopAfterFirstShard(False)
    run_transfer(None, run, resume=True, reporter=again, device="cpu")
    stored = [line.split(" (")[0] for line in again.lines if line.startswith("teacher pass")]
    # the 8 training rows 4 steps read, 2 per shard; then the 2 held-out rows
    assert stored == [f"teacher pass: train shard {i} stored" for i in (2, 3, 4)] + [
        "teacher pass: heldout shard 1 stored"]
    _same_weights(blocks_of_one, run)


def test_too_little_disk_is_refused_with_the_numbers_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    from lolcats_cli.core.train.transfer_modes import block_cache

    monkeypatch.setattr(block_cache, "free_bytes", lambda path: 10_000)
    with pytest.raises(TrainingError) as err:
        run_transfer(tiny_recipe(model_dir, "transfer.block_size=1"), tmp_path / "run", device="cpu")
    # the 12 training rows 6 steps x grad_accum 2 read (of 40) + 2 held-out, of 96 tokens; hidden 64, bf16, 2 blocks
    tokens = 14 * 96
    need = 2 * tokens * 64 * 2
    message = str(err.value)
    assert f"2 bytes x {tokens:,} tokens x 64 hidden x 2 blocks" in message
    assert block_cache.human_bytes(need) in message and "10.0 KB" in message
    assert "transfer.block_size" in message
    assert not (tmp_path / "run").exists()


def _torchrun_transfer(recipe, tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """``torchrun --nproc-per-node 2 -m lolcats_cli transfer`` (gloo on CPU) of ``recipe``: (run, process)."""
    from lolcats_cli.core.recipe.recipe import save_resolved

    run, path = tmp_path / "run", save_resolved(recipe, tmp_path / "recipe")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lolcats_cli", "transfer", "--recipe", str(path), "--output", str(run), "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc


def test_two_gloo_ranks_under_torchrun_match_one_rank(model_dir, blocks_of_one, tmp_path):
    run, proc = _torchrun_transfer(tiny_recipe(model_dir, *BLOCKS_OF_ONE), tmp_path)
    _same_weights(blocks_of_one, run, atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(b["block"], b["rank"]) for b in metrics["blocks"]] == [("block-000", 0), ("block-001", 1)]
    assert metrics["world_size"] == 2
    assert proc.stdout.count("held-out MSE per layer") == 1  # rank 0 prints the table, once


def test_joint_transfer_over_two_gloo_ranks_shards_the_model_and_matches_one_process(model_dir, tmp_path):
    common = ("transfer.max_steps=4", "transfer.eval_every=2")  # grad_accum 2: one micro-batch per rank
    run_transfer(tiny_recipe(model_dir, *common), tmp_path / "one", device="cpu")
    run, proc = _torchrun_transfer(tiny_recipe(model_dir, *common), tmp_path)
    _same_weights(tmp_path / "one", run, atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["mode"], metrics["world_size"], metrics["steps"]) == ("fsdp", 2, 4)
    assert metrics["tokens_seen"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["tokens_seen"]
    assert proc.stdout.count("held-out MSE per layer") == 1


# ------------------------------------------------------------------------------------ float8 block inputs
# e4m3 keeps 3 mantissa bits: a value in [2^e, 2^(e+1)) is rounded to a grid of step 2^(e-3), so it moves by at most
# half a step, 2^-4 = 6.25% of itself. Below 2^-6 (after scaling) the grid is the subnormal one, step 2^-9: at most
# 2^-10 x the row's scale off. Division and the dequantising product add one fp32 rounding each (~1e-7).
E4M3_REL, E4M3_SUBNORMAL = 2.0**-4, 2.0**-10


def _float8_cache(root: Path, dtype: str, rows: int):
    from lolcats_cli.core.train.transfer_modes.block_cache import BlockCache, plan_blocks

    blocks = plan_blocks(2, 1, [0, 1])
    return BlockCache(root, blocks, seq_len=96, hidden=64, dtype=dtype, rows={"train": rows, "heldout": 1},
                      shard_rows=2), blocks


def _store(cache, blocks, inputs: dict[str, torch.Tensor]) -> None:
    """What the teacher pass does: every shard, packed as a batch of its rows, then the manifest."""
    for split, x in inputs.items():
        for shard, a, b in cache.shards(split):
            parts = {blk.start: [cache.pack(x[a:b] * (1 + blk.start))] for blk in blocks}
            cache.write_shard(split, shard, parts, blocks)
    cache.mark_complete()


def test_float8_block_inputs_read_back_within_e4m3_precision_with_a_scale_per_row(tmp_path):
    from safetensors import safe_open

    # rows of very different sizes in the same shard (0.001 beside 1000): a per-shard scale would flush the small
    # row to zero; a row of zeros; a residual-stream-like outlier channel in one row
    torch.manual_seed(0)
    scales = torch.tensor([1e-3, 1e3, 1.0, 0.0, 3.0]).view(-1, 1, 1)  # shards: rows 0-1, 2-3, 4
    train = torch.randn(5, 96, 64) * scales
    train[4, :, 7] *= 200.0
    inputs = {"train": train, "heldout": torch.randn(1, 96, 64)}
    cache, blocks = _float8_cache(tmp_path / "f8", "float8", rows=5)
    _store(cache, blocks, inputs)

    with safe_open(str(cache.input_path("train", blocks[1], 0)), framework="pt") as f:
        assert f.get_tensor("hidden").dtype == torch.float8_e4m3fn and f.get_tensor("hidden").shape == (2, 96, 64)
        assert f.get_tensor("scale").dtype == torch.float32 and f.get_tensor("scale").shape == (2,)
    manifest = json.loads((cache.inputs / "manifest.json").read_text())
    assert manifest["dtype"] == "float8" and "scale" in manifest and cache.complete()

    order = torch.tensor([4, 0, 3, 2, 1])  # across shards, out of order, as the trainer draws them
    for blk in blocks:
        expected = train[order] * (1 + blk.start)
        got = cache.stored("train", blk).take(order)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        row_scale = expected.abs().flatten(1).amax(dim=1).view(-1, 1, 1) / 448
        bound = E4M3_REL * expected.abs() * (1 + 1e-6) + E4M3_SUBNORMAL * row_scale
        assert ((got - expected).abs() <= bound).all()
        assert (got[2] == 0).all()  # the zero row stays zero (scale 1, not 0/0)
        normal = expected.abs() >= 2.0**-6 * row_scale  # |x / scale| >= 2^-6: e4m3's normal range
        rel = ((got - expected).abs() / expected.abs().clamp_min(1e-30))[normal]
        assert 2.0**-5 < rel.max() <= E4M3_REL * (1 + 1e-6)  # really 3 mantissa bits, no more, no less
        assert (got[1] != 0).sum() > 0.99 * got[1].numel()  # the 1e-3 row keeps its own resolution
    torch.testing.assert_close(cache.stored("heldout", blocks[0]).take(torch.tensor([0])), inputs["heldout"],
                               rtol=E4M3_REL, atol=E4M3_SUBNORMAL * inputs["heldout"].abs().max() / 448)


def test_float8_block_inputs_take_half_the_disk_of_bfloat16(tmp_path, tiny_model_dir, monkeypatch):
    from lolcats_cli.core.train.transfer_modes import block_cache
    from lolcats_cli.core.train.transfer_modes.plan import Hardware, plan_transfer

    inputs = {"train": torch.randn(5, 96, 64), "heldout": torch.randn(1, 96, 64)}
    sizes = {}
    for dtype in ("bfloat16", "float8"):
        cache, blocks = _float8_cache(tmp_path / dtype, dtype, rows=5)
        _store(cache, blocks, inputs)
        sizes[dtype] = (cache.bytes_needed(blocks), cache.bytes_present(blocks))
    assert sizes["float8"][0] * 2 == sizes["bfloat16"][0] == 2 * 6 * 96 * 64 * 2
    # the files: the estimate plus headers and 4-byte row scales (both well under 1% of a real shard)
    assert sizes["float8"][0] < sizes["float8"][1] < 0.52 * sizes["bfloat16"][1]

    cpu = Hardware("cpu", "a test CPU", 1, 64 * 10**9, 50e9)
    plans = {dtype: plan_transfer(tiny_recipe(tiny_model_dir, "transfer.block_size=1",
                                              f"transfer.block_cache_dtype={dtype}"), output=tmp_path, hardware=cpu)
             for dtype in ("bfloat16", "float8")}
    planned = 6 * 2 * 96 + 2 * 96  # --dry-run counts what max_steps 6 x grad_accum 2 reads, + 2 held-out rows
    assert plans["float8"].disk["block_inputs"] * 2 == plans["bfloat16"].disk["block_inputs"] == 2 * planned * 64 * 2
    assert plans["float8"].disk["formula"] == f"1 byte x {planned:,} tokens x 64 hidden x 2 blocks"
    assert plans["bfloat16"].disk["formula"] == f"2 bytes x {planned:,} tokens x 64 hidden x 2 blocks"
    tokens = planned  # the run stores what its training reads, as --dry-run counts: 12 training + 2 held-out rows

    monkeypatch.setattr(block_cache, "free_bytes", lambda path: 10_000)
    with pytest.raises(TrainingError) as err:  # the disk check before the model loads says the same
        run_transfer(tiny_recipe(tiny_model_dir, "transfer.block_size=1", "transfer.block_cache_dtype=float8"),
                     tmp_path / "run", device="cpu")
    assert f"1 byte x {tokens:,} tokens x 64 hidden x 2 blocks" in str(err.value)
    assert block_cache.human_bytes(tokens * 64 * 2) in str(err.value)


def test_an_unknown_block_cache_dtype_is_refused_naming_it_and_the_choices(tiny_model_dir):
    from lolcats_cli.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_recipe(tiny_model_dir, "transfer.block_cache_dtype=fp8")
    message = str(err.value)
    assert "transfer.block_cache_dtype: invalid choice 'fp8'; choices: 'bfloat16', 'float32', 'float8'" in message


def test_block_wise_transfer_from_float8_inputs_ends_close_to_bfloat16(model_dir, tmp_path):
    """The float8 run trains on (and evaluates with) inputs rounded to e4m3, each value up to 6.25% off (about 2%
    RMS), but independently across the 96 x 64 values of a row: a layer's MSE, a mean over thousands of head
    outputs, moves far less. Measured: 0.6% (layer 0) and 0.2% (layer 1) from the bfloat16 run's; 2% is three
    times that, while a broken dequantisation (a scale dropped or applied twice: inputs 448 times off) changes
    the MSE by orders of magnitude."""
    steps = ("transfer.block_size=1", "transfer.max_steps=4", "transfer.eval_every=2")
    runs = {dtype: run_transfer(tiny_recipe(model_dir, *steps, f"transfer.block_cache_dtype={dtype}"),
                                tmp_path / dtype, device="cpu") for dtype in ("bfloat16", "float8")}
    bf16, f8 = runs["bfloat16"].layers, runs["float8"].layers
    assert [r["layer"] for r in f8] == [r["layer"] for r in bf16] == [0, 1]
    for a, b in zip(f8, bf16):
        assert a["mse_after"] < a["mse_before"]  # it trained
        assert a["mse_before"] == pytest.approx(b["mse_before"], rel=0.02)
        assert a["mse_after"] == pytest.approx(b["mse_after"], rel=0.02)
    metrics = {d: json.loads((tmp_path / d / "metrics.json").read_text())["block_inputs"] for d in runs}
    assert metrics["float8"]["dtype"] == "float8" and 2 * metrics["float8"]["bytes"] == metrics["bfloat16"]["bytes"]
    assert json.loads((tmp_path / "float8" / "blocks" / "inputs" / "manifest.json").read_text())["dtype"] == "float8"
