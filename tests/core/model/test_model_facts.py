"""The recipe for what a model is (GGUF header or config.json, no weights loaded), and the data budget checked
before any weights load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from lolcats_cli.core.data.data import check_data_budget
from lolcats_cli.core.model.model_facts import match_recipe, read_gguf_header, read_model_facts
from lolcats_cli.core.recipe.init_recipe import recipe_for_model
from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
from lolcats_cli.errors import DataError


def write_gguf(path: Path, layers: int, hidden: int, vocab: int = 49152) -> Path:
    """A GGUF holding a llama header (with a vocabulary array to skip) and two small tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_context_length(8192)
    writer.add_vocab_size(vocab)
    writer.add_name("My Model")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_tensor("token_embd.weight", np.zeros((12, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _config(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA_8B = dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)


def test_the_gguf_header_is_read_without_its_data(tmp_path) -> None:
    import gguf

    path = write_gguf(tmp_path / "x.gguf", 30, 576)
    meta, params = read_gguf_header(path)
    assert (meta["general.architecture"], meta["llama.block_count"], meta["llama.embedding_length"]) == ("llama", 30, 576)
    assert "tokenizer.ggml.tokens" not in meta and params == 12 * 8 + 8
    assert meta["general.name"] == gguf.GGUFReader(str(path)).fields["general.name"].contents()
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(tmp_path / "bad.gguf")


def test_a_local_gguf_gets_the_recipe_of_its_shape_not_the_papers_defaults(tmp_path) -> None:
    gguf = write_gguf(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", 30, 576)
    recipe, why = recipe_for_model(str(gguf))
    assert recipe.model.name == str(gguf)
    assert (recipe.data.seq_len, recipe.transfer.max_steps, recipe.data.holdout) == (512, 200, 4)  # smollm2-135m
    assert why.startswith("the shipped recipe smollm2-135m: it is a llama model with 30 layers of width 576")


def test_real_smollm2_gguf_by_its_path(smollm2_gguf) -> None:
    recipe, why = recipe_for_model(str(smollm2_gguf))
    assert "smollm2-135m" in why and "135M parameters" in why and recipe.data.seq_len == 512


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, "llama-3.1-8b"),
    ({"max_position_embeddings": 8192}, "llama-3-8b"),
    ({"model_type": "mistral", "vocab_size": 32000, "max_position_embeddings": 32768}, "mistral-7b-v0.1"),
    ({"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64}, "llama-3.1-70b"),
])
def test_a_local_folder_gets_the_recipe_of_its_shape(tmp_path, changes, expected) -> None:
    folder = _config(tmp_path / "my-finetune", **{**LLAMA_8B, **changes})
    recipe, why = recipe_for_model(str(folder))
    assert why.startswith(f"the shipped recipe {expected}: ") and "the shape" in why
    assert recipe.model.name == str(folder)


def test_an_unknown_shape_gets_the_recipe_closest_in_size(tmp_path) -> None:
    qwen_half = _config(tmp_path / "q", model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    facts = read_model_facts(str(qwen_half))
    assert facts is not None and 4.5e8 < facts.parameters < 5.5e8  # Qwen2-0.5B has 494M
    assert match_recipe(facts)[0] == "smollm2-135m"
    big = _config(tmp_path / "b", **{**LLAMA_8B, "num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40})
    name, why = match_recipe(read_model_facts(str(big)))
    assert name in ("llama-3.1-8b", "llama-3-8b") and "closest in size" in why


def test_an_unreadable_model_gets_the_papers_defaults(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    recipe, why = recipe_for_model(str(tmp_path / "empty"))
    assert why.startswith("the paper's defaults") and recipe.data.seq_len == Recipe().data.seq_len


def _recipe(model: Path, *extra: str) -> Recipe:
    base = ["data.dataset=pydoc", "data.seq_len=96", "attention.window_params.size=16", "data.holdout=4",
            "transfer.grad_accum=2", "transfer.max_steps=6"]
    return Recipe.from_dict(apply_overrides(Recipe().to_dict(), [f"model.name={model}", *base, *extra]))


def test_a_dataset_too_small_fails_before_any_weights_load(tiny_model_dir, tmp_path) -> None:
    from lolcats_cli.core.train.transfer import run_transfer

    no_weights = tmp_path / "no-weights"  # config and tokenizer only: loading weights would fail otherwise
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"after holding out 100000 sequences \(9,600,000 tokens\) that leaves 0 tokens") as err:
        run_transfer(_recipe(no_weights, "data.holdout=100000"), run, device="cpu")
    assert not run.exists()
    assert "lower data.holdout (data.holdout=16 leaves 2,245 training sequences) or data.seq_len" in str(err.value.hint)


def test_too_few_sequences_for_the_steps_warn_with_the_numbers(tiny_model_dir, tiny_tokenizer, caplog) -> None:
    recipe = _recipe(tiny_model_dir, "data.max_samples=40", "transfer.max_steps=500")
    with caplog.at_level(logging.WARNING, logger="lolcats_cli.core.data.data"):
        train = check_data_budget(recipe, tokenizer=tiny_tokenizer)
    assert len(train) == 40
    assert ("data: transfer.max_steps=500 asks for 500 updates of 2 x 96 tokens (1,000 sequences), but 'pydoc' gives "
            "40 training sequences after the held-out ones, so transfer.epochs=2 passes make 40 updates and the run "
            "stops there; for all 500, set transfer.epochs=25") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lolcats_cli.core.data.data"):
        check_data_budget(_recipe(tiny_model_dir, "data.max_samples=40", "transfer.max_steps=40"), tokenizer=tiny_tokenizer)
    assert caplog.text == ""


def test_cli_says_which_recipe_and_fails_on_the_data_before_loading(tiny_model_dir, tmp_path, capsys) -> None:
    import re

    import torch

    from lolcats_cli.cli.main import main

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["transfer", "--model", str(no_weights), "--output", str(tmp_path / "run"), "data.holdout=100000"])
    finally:
        torch.set_num_threads(threads)
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code != 0 and "DataError" in err and "ModelError" not in err
    assert re.search(r"recipe: the shipped recipe smollm2-135m: it is a llama model with 2 layers of width 64, "
                     r"0\.\d\dM parameters; no shipped recipe is for that shape, and smollm2-135m \(135M parameters\) "
                     r"is the closest in size", err)
    assert "data.holdout=16 leaves 408 training sequences" in err  # the recipe's seq_len, 512
    assert not (tmp_path / "run").exists()
