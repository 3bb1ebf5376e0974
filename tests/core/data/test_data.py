"""Text sources -> packed sequences: pydoc, local files, templates, hold-out, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lolcats_cli.core.data.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE,
    build_datasets,
    load_texts,
)
from lolcats_cli.core.recipe.recipe import DataConfig
from lolcats_cli.errors import DataError


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Task {i:04d}.", "input": "" if i % 2 else f"context {i}", "output": f"Answer {i:04d} " * 4}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_pydoc_corpus_packs_and_holds_out_by_sequences(tiny_tokenizer):
    cfg = DataConfig(dataset="pydoc", seq_len=256, holdout=3)
    train, held = build_datasets(cfg, tiny_tokenizer)
    assert held.input_ids.shape == (3, 256) and train.input_ids.shape[1] == 256 and len(train) > 100
    assert train.input_ids.dtype == torch.int64 and torch.equal(train.labels, train.input_ids)  # plain text: no mask
    assert held.stats["holdout_by"] == "sequences" and train.stats["template"] == "text"
    # deterministic, and the held-out tokens are the start of the stream, disjoint from training
    again_train, again_held = build_datasets(cfg, tiny_tokenizer)
    assert torch.equal(again_train.input_ids, train.input_ids) and torch.equal(again_held.input_ids, held.input_ids)
    whole, _ = build_datasets(DataConfig(dataset="pydoc", seq_len=256, holdout=0), tiny_tokenizer)
    assert torch.equal(whole.input_ids[:3], held.input_ids) and torch.equal(whole.input_ids[3:], train.input_ids)
    eos = tiny_tokenizer.eos_token_id
    assert (whole.input_ids == eos).sum() >= 70  # one EOS after each of the ~79 topics (minus the dropped tail)
    capped, _ = build_datasets(DataConfig(dataset="pydoc", seq_len=256, holdout=3, max_samples=5), tiny_tokenizer)
    assert len(capped) == 5


def test_alpaca_jsonl_template_mask_and_disjoint_holdout(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(120))
    cfg = DataConfig(dataset=str(path), seq_len=64, holdout=10)
    examples = load_texts(cfg)
    assert examples[0].prompt == ALPACA_PROMPT.format(instruction="Task 0000.", input="context 0")
    assert examples[1].prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Task 0001.")
    assert examples[1].response == "Answer 0001 " * 4
    train, held = build_datasets(cfg, tiny_tokenizer)
    assert train.stats["template"] == "alpaca" and held.stats["examples"] == 10 and train.stats["examples"] == 110
    held_text = tiny_tokenizer.decode(held.input_ids.reshape(-1))
    train_text = tiny_tokenizer.decode(train.input_ids.reshape(-1))
    assert "Task 0001." in held_text and "Task 0001." not in train_text
    assert "Task 0050." in train_text and "Task 0050." not in held_text
    # labels: -100 exactly on prompt tokens; answers (and EOS) are trained on
    mask = train.labels == IGNORE
    assert 0.3 < mask.float().mean() < 0.95
    assert torch.equal(train.labels[~mask], train.input_ids[~mask])
    answers = tiny_tokenizer.decode(train.input_ids[~mask])
    assert "Answer 0050" in answers and "Below is an instruction" not in answers
    capped, _ = build_datasets(DataConfig(dataset=str(path), seq_len=64, holdout=10, max_samples=20), tiny_tokenizer)
    assert capped.stats["examples"] == 20 and len(capped) < len(train)


def test_json_parquet_and_txt_files(tmp_path, tiny_tokenizer):
    rows = [{"text": f"Document number {i}. " * 30, "id": i} for i in range(40)]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "keyed.json").write_text(json.dumps({"data": rows}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    results = []
    for name in ("list.json", "keyed.json", "t.parquet"):
        train, held = build_datasets(DataConfig(dataset=str(tmp_path / name), seq_len=32, holdout=2), tiny_tokenizer)
        assert train.stats["template"] == "text" and held.stats["examples"] == 2
        results.append(train.input_ids)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    (tmp_path / "book.txt").write_text("A long story about a cat. " * 400)
    train, held = build_datasets(DataConfig(dataset=str(tmp_path / "book.txt"), seq_len=64, holdout=2), tiny_tokenizer)
    assert held.input_ids.shape == (2, 64) and held.stats["holdout_by"] == "sequences" and len(train) > 10


def test_text_field_and_missing_column(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "b.jsonl", [{"body": "Some words here. " * 40, "title": "t"} for _ in range(10)])
    train, _ = build_datasets(DataConfig(dataset=str(path), text_field="body", seq_len=32, holdout=1), tiny_tokenizer)
    assert len(train) > 10
    with pytest.raises(DataError, match="data.text_field: the dataset has no column 'text'; its columns: body, title"):
        build_datasets(DataConfig(dataset=str(path), seq_len=32, holdout=1), tiny_tokenizer)
    with pytest.raises(DataError, match="alpaca template needs"):
        load_texts(DataConfig(dataset=str(path), template="alpaca"))


def test_chat_template_masks_all_but_the_last_answer(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Reply {i}."}]}
            for i in range(60)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples = load_texts(DataConfig(dataset=str(path)), tiny_tokenizer)
    assert examples[0].prompt == "<|im_start|>user\nQuestion 0?<|im_end|>\n<|im_start|>assistant\n"
    assert examples[0].response == "Reply 0.<|im_end|>\n" and examples[0].special_tokens is False
    train, _ = build_datasets(DataConfig(dataset=str(path), seq_len=32, holdout=4), tiny_tokenizer)
    assert train.stats["template"] == "chat"
    trained = tiny_tokenizer.decode(train.input_ids[train.labels != IGNORE])
    assert "Reply 10." in trained and "Question" not in trained


def test_too_short_and_other_errors(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "small.jsonl", alpaca_rows(5))
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(dataset=str(path), seq_len=4096, holdout=0), tiny_tokenizer)
    msg = str(info.value)
    assert "fewer than one sequence of data.seq_len=4096" in msg and "tokens" in msg and "lower data.seq_len" in msg
    with pytest.raises(DataError, match="held-out examples hold"):
        build_datasets(DataConfig(dataset=str(path), seq_len=512, holdout=1), tiny_tokenizer)
    with pytest.raises(DataError, match="after holding out 1000 sequences"):
        build_datasets(DataConfig(dataset="pydoc", seq_len=512, holdout=1000), tiny_tokenizer)
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown extension '.csv'.*\n.*supported: .json, .jsonl, .parquet, .txt"):
        load_texts(DataConfig(dataset=str(tmp_path / "t.csv")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: invalid JSON"):
        load_texts(DataConfig(dataset=str(tmp_path / "bad.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_texts(DataConfig(dataset=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="no such file or folder"):
        load_texts(DataConfig(dataset=str(tmp_path / "missing.jsonl")))


def test_uncached_hub_dataset_fails_offline_without_asking_the_hub(monkeypatch):
    from lolcats_cli.core.model import hub

    asked = []
    monkeypatch.setattr(hub, "_ask", lambda *a: asked.append(a) or hub.HubStatus("ok"))
    with pytest.raises(DataError, match="'yahma/alpaca-cleaned' is not available offline"):
        load_texts(DataConfig(dataset="yahma/alpaca-cleaned"))
    assert asked == []  # offline mode: no network call at all, so no retries to wait for


def test_unreachable_hub_dataset_fails_fast(monkeypatch):
    from lolcats_cli.core.model import hub

    monkeypatch.setattr(hub, "offline", lambda repo_type="model": False)
    monkeypatch.setattr(hub, "probe", lambda *a, **k: hub.HubStatus("unreachable", "DNS failure"))
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub to read 'yahma/alpaca-cleaned'"):
        load_texts(DataConfig(dataset="yahma/alpaca-cleaned"))


@pytest.mark.slow
def test_pydoc_with_the_smollm2_tokenizer(smollm2_gguf):
    from lolcats_cli.core.model.models import load_tokenizer
    from lolcats_cli.core.recipe.recipe import load_recipe

    recipe = load_recipe("smollm2-135m")
    tok = load_tokenizer(recipe.model)
    train, held = build_datasets(recipe.data, tok)
    total = train.stats["tokens"] + train.stats["dropped_tokens"] + held.stats["tokens"]
    assert 100_000 < total < 130_000  # about 113k tokens
    assert held.input_ids.shape == (4, 512) and len(train) >= recipe.transfer.max_steps


def test_passkey_fraction_mixes_retrieval_prompts_with_only_the_answer_as_label(tiny_tokenizer):
    from lolcats_cli.core.eval.passkey import build_prompts

    plain, held = build_datasets(DataConfig(dataset="pydoc", seq_len=256, holdout=3), tiny_tokenizer)
    mixed, held2 = build_datasets(DataConfig(dataset="pydoc", seq_len=256, holdout=3, passkey_fraction=0.2),
                                  tiny_tokenizer)
    n = mixed.stats["passkey_sequences"]
    assert n == round(len(plain) * 0.2 / 0.8) and len(mixed) == len(plain) + n
    assert torch.equal(held.input_ids, held2.input_ids)  # the held-out text is untouched
    question = tiny_tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    rows = [i for i in range(len(mixed)) if (mixed.labels[i] != IGNORE).sum() < 20]
    assert len(rows) == n  # exactly the passkey rows have (almost) no labels: only their answer
    eval_keys = {p.key for p in build_prompts(tiny_tokenizer, 256, 20, seed=0)}
    for i in rows:
        answer = mixed.input_ids[i][mixed.labels[i] != IGNORE]
        text = tiny_tokenizer.decode(mixed.input_ids[i])
        key = tiny_tokenizer.decode(answer).strip()
        assert key.isdigit() and f"The pass key is {key}." in text and key not in eval_keys
        ids = mixed.input_ids[i].tolist()
        start = int((mixed.labels[i] != IGNORE).nonzero()[0])
        assert ids[start - len(question) : start] == question  # the answer follows the question
    # the real sequences are all still there, in some order
    assert sorted(map(tuple, mixed.input_ids.tolist())) == sorted(
        map(tuple, plain.input_ids.tolist() + [mixed.input_ids[i].tolist() for i in rows])
    )
