"""`lolcats eval` on a tiny trained run: the four rows, their metrics, lm-eval through our model, the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from lolcats_cli.cli.main import register_commands
from lolcats_cli.core.eval import lm_eval_bridge
from lolcats_cli.core.eval.evaluate import DEFAULT_ROWS, as_row, evaluate_run, sink_mask, zero_linear_branch
from lolcats_cli.core.eval.passkey import build_prompts
from lolcats_cli.core.progress import NullReporter
from lolcats_cli.core.train.transfer import run_transfer
from lolcats_cli.errors import ConfigError, DataError, LolcatsError

from tiny_recipes import tiny_recipe  # tests/ is on sys.path (rootdir conftest)

CONTEXTS = (68, 1100)  # 68 = window 64 + 4 sinks: the sink row sees every key; 1100 > 1024: "past 1024" exists
MAX_TOKENS = 2200
TASK = "lolcats_tiny_mc"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    run_transfer(tiny_recipe(tiny_model_dir), run, device="cpu")
    return run


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40000])
    return path


class Recorder(NullReporter):
    """A reporter that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, title, total_steps, done_steps):
        self.calls.append(("start", title, total_steps, done_steps))

    def step(self, info):
        self.calls.append(("step", info.step, info.total_steps, info.tokens))

    def log(self, message):
        self.calls.append(("log", message))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture(scope="module")
def recorded(run_dir, text_file) -> tuple:
    progress = Recorder()
    report = evaluate_run(run_dir, text_file=text_file, contexts=CONTEXTS, passkey_lengths=(256,), passkey_n=3,
                          max_tokens=MAX_TOKENS, device="cpu", reporter=progress)
    return report, progress


@pytest.fixture(scope="module")
def report(recorded):
    return recorded[0]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A two-choice lm-eval task over a local JSONL file: no network needed."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(8)]
    (folder / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "tiny.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    return folder


def _direct_ppl(model_dir: Path, text_file: Path, context: int) -> float:
    """Perplexity of the original HF model, computed from scratch over the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(tok(text_file.read_text())["input_ids"])
    n = min(ids.numel() // context, MAX_TOKENS // context)
    total = 0.0
    with torch.no_grad():
        for w in ids[: n * context].view(n, context):
            logits = model(input_ids=w[None]).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits.float(), w[1:], reduction="sum").item()
    return math.exp(total / (n * (context - 1)))


# ------------------------------------------------------------------------------------------- the rows


def test_every_row_has_every_metric_and_values_are_finite(report):
    assert list(report.rows) == list(DEFAULT_ROWS)
    for name, row in report.rows.items():
        assert set(row.perplexity) == set(CONTEXTS), name
        assert set(row.perplexity_past_1024) == {1100}, name
        assert all(math.isfinite(v) and v > 1 for v in [*row.perplexity.values(), *row.perplexity_past_1024.values()])
        assert set(row.passkey) == {256} and 0.0 <= row.passkey[256] <= 1.0
    for name in ("linearized", "linear_zeroed"):
        mse = report.rows[name].attention_mse
        assert set(mse) == {0, 1} and all(math.isfinite(v) and v >= 0 for v in mse.values())
    assert report.rows["teacher"].attention_mse is None
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rows"]["linearized"]["perplexity"]["1100"] == report.rows["linearized"].perplexity[1100]


def test_progress_has_one_step_per_row_and_context_or_passkey_length(recorded):
    _, progress = recorded
    # per row: 2 contexts + 1 passkey length, and the attention MSE for the 2 linearized rows
    units = len(DEFAULT_ROWS) * (len(CONTEXTS) + 1) + 2
    assert progress.calls[0] == ("start", "eval", units, 0) and progress.calls[-1] == ("finish",)
    steps = [c for c in progress.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, units + 1)) and all(c[2] == units for c in steps)
    tokens = [c[3] for c in steps]
    assert tokens == sorted(tokens) and tokens[0] == 68 * (MAX_TOKENS // 68)  # teacher, perplexity at 68
    logs = [c[1] for c in progress.calls if c[0] == "log"]
    assert logs[:3] == ["teacher: perplexity at 68 tokens", "teacher: perplexity at 1100 tokens",
                        "teacher: passkey retrieval, 3 prompts at 256 tokens"]
    assert "linearized: attention MSE per layer at 1100 tokens" in logs


def test_teacher_perplexity_is_the_original_model(report, tiny_model_dir, text_file):
    for context in CONTEXTS:
        assert report.rows["teacher"].perplexity[context] == pytest.approx(
            _direct_ppl(tiny_model_dir, text_file, context), rel=1e-5
        )


def test_sink_window_equals_teacher_while_every_key_is_inside_window_plus_sinks(report):
    teacher, sink = report.rows["teacher"], report.rows["sink_window"]
    assert sink.perplexity[68] == pytest.approx(teacher.perplexity[68], rel=1e-6)
    assert sink.perplexity[1100] != pytest.approx(teacher.perplexity[1100], rel=1e-7)  # the mask does act


def test_zeroing_the_linear_branch_changes_the_model_when_the_window_is_small(report):
    lin, zero = report.rows["linearized"], report.rows["linear_zeroed"]
    assert zero.perplexity[1100] != pytest.approx(lin.perplexity[1100], rel=1e-7)
    assert all(zero.attention_mse[i] != pytest.approx(lin.attention_mse[i], rel=1e-4) for i in lin.attention_mse)


def test_passkey_is_deterministic_with_the_seed(report, run_dir, tiny_tokenizer):
    again = evaluate_run(run_dir, contexts=(), passkey_lengths=(256,), passkey_n=3, rows=["linearized"], device="cpu")
    assert again.rows["linearized"].passkey == report.rows["linearized"].passkey
    first, same, other = (build_prompts(tiny_tokenizer, 256, 3, seed) for seed in (0, 0, 1))
    assert first == same and first != other
    assert all(len(p.prompt_ids) + len(p.answer_ids) <= 256 for p in first)


def test_recall_row_spans_linearized_to_teacher(run_dir, text_file):
    """The recall-cache row: with 0 slots it is the linearized row; with a slot for every key no key is linear
    any more and a transfer run (projections untouched) is its teacher again."""
    def ppl(rows, slots):
        report = evaluate_run(run_dir, text_file=text_file, contexts=(1100,), passkey_lengths=(), max_tokens=1100,
                              device="cpu", rows=rows, recall_slots=slots)
        return {name: row.perplexity[1100] for name, row in report.rows.items()}

    none, every = ppl(["linearized"], 0), ppl(["teacher"], 1100)
    assert list(none) == ["linearized", "linearized_recall"] and list(every) == ["teacher", "linearized_recall"]
    assert none["linearized_recall"] == pytest.approx(none["linearized"], rel=1e-6)
    assert every["linearized_recall"] == pytest.approx(every["teacher"], rel=1e-6)
    # (a random tiny model: its rows differ little, but far more than the agreement above)
    assert every["teacher"] != pytest.approx(none["linearized"], rel=1e-4)
    with pytest.raises(ConfigError, match="recall_slots=-1"):
        evaluate_run(run_dir, contexts=(), passkey_lengths=(), device="cpu", recall_slots=-1)


def test_a_heavy_cpu_evaluation_says_so_with_a_lighter_command(recorded, run_dir):
    from lolcats_cli.core.eval.evaluate import cpu_load_warning

    logs = [c[1] for c in recorded[1].calls if c[0] == "log"]
    assert not any("reads" in m and "tokens on the CPU" in m for m in logs)  # this small one does not warn
    heavy = cpu_load_warning(["teacher", "linearized"], {2048: torch.zeros(40, 2048, dtype=torch.long)}, {})
    assert heavy is not None and "163,840 tokens on the CPU (2 rows x 81,920)" in heavy and "--max-tokens 8192" in heavy
    assert cpu_load_warning(["teacher"], {512: torch.zeros(4, 512, dtype=torch.long)}, {}) is None


def test_context_managers_put_everything_back(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.model.convert import convert_model, linearized_layers

    model = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), mode="student")
    maps = [m.feature_map_q for _, m in linearized_layers(model)]
    with as_row(model, "sink_window"):
        assert {m.mode for _, m in linearized_layers(model)} == {"teacher"}
        assert all(m._forward_pre_hooks for _, m in linearized_layers(model))
    with zero_linear_branch(model):
        assert all(m.feature_map_q is not fm for (_, m), fm in zip(linearized_layers(model), maps, strict=True))
    assert [m.feature_map_q for _, m in linearized_layers(model)] == maps
    assert {m.mode for _, m in linearized_layers(model)} == {"student"}
    assert not any(m._forward_pre_hooks for _, m in linearized_layers(model))
    mask = sink_mask(0, 70, 70, window=64, sinks=4, device=torch.device("cpu"))[0, 0]
    assert mask[69].tolist() == [True] * 4 + [False, False] + [True] * 64


def test_a_plain_model_has_teacher_and_sink_rows_only(tiny_model_dir, text_file):
    report = evaluate_run(model_id=str(tiny_model_dir), text_file=text_file, contexts=(68,), passkey_lengths=(),
                          max_tokens=MAX_TOKENS, device="cpu")
    assert list(report.rows) == ["teacher", "sink_window"] and report.kind == "model"
    assert report.rows["teacher"].perplexity[68] == pytest.approx(_direct_ppl(tiny_model_dir, text_file, 68), rel=1e-5)


# --------------------------------------------------------------------------------------------- lm-eval


def test_a_local_lm_eval_task_runs_offline_through_our_model(run_dir, task_dir):
    report = evaluate_run(run_dir, contexts=(), passkey_lengths=(), tasks=[TASK], include_path=task_dir, limit=4,
                          rows=["teacher", "linearized"], device="cpu")
    for row in report.rows.values():
        assert 0.0 <= row.lm_eval[TASK]["acc"] <= 1.0
    assert report.tasks == [TASK]


def test_unknown_task_names_suggest_the_close_one(run_dir, task_dir, monkeypatch):
    # lm-eval's full index takes ~20 s to build; the lookup and the message are the same over the local one
    local = lm_eval_bridge.task_manager
    monkeypatch.setattr(lm_eval_bridge, "task_manager", lambda path, include_defaults=True: local(path, False))
    with pytest.raises(ConfigError) as err:
        evaluate_run(run_dir, tasks=["lolcats_tiny_mcq"], include_path=task_dir, device="cpu")
    assert "'lolcats_tiny_mcq'" in str(err.value) and f"did you mean '{TASK}'" in str(err.value)
    assert "--include-path" in str(err.value)


def test_missing_lm_eval_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LolcatsError, match=r"pip install 'lolcats\[eval\]'"):
        lm_eval_bridge.require_lm_eval()


# ---------------------------------------------------------------------------------------------- errors


def test_missing_or_incomplete_run_directory(tmp_path, run_dir):
    with pytest.raises(LolcatsError, match="not a finished lolcats run .*the folder itself"):
        evaluate_run(tmp_path / "nope", device="cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "recipe.resolved.yaml").write_text((run_dir / "recipe.resolved.yaml").read_text())
    with pytest.raises(LolcatsError, match="attention.safetensors, metrics.json"):
        evaluate_run(partial, device="cpu")


def test_text_shorter_than_the_context_says_how_many_tokens(run_dir):
    # the run's held-out split: 4 sequences of 96 tokens
    with pytest.raises(DataError, match=r"has 384 tokens, fewer than the context length 512") as err:
        evaluate_run(run_dir, contexts=(512,), passkey_lengths=(), device="cpu")
    assert "--contexts" in err.value.hint


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_tables_and_json(run_dir, text_file):
    app = typer.Typer()
    register_commands(app, [("eval", "eval"), ("plugins", "plugins")])  # two commands: a group, as in main
    runner = CliRunner()
    args = ["eval", str(run_dir), "--text", str(text_file), "--contexts", "68,1100", "--passkey", "256",
            "--passkey-n", "1", "--max-tokens", "1100", "--device", "cpu"]
    shown = runner.invoke(app, args, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for word in ("teacher", "sink window", "linearized", "linear zeroed", "ppl@1100", "ppl >1024 @1100",
                 "passkey@256", "attention MSE"):
        assert word in shown.output, word
    done = runner.invoke(app, [*args[:5], "68", "--passkey", "none", "--max-tokens", "136", "--json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert set(data["rows"]) == set(DEFAULT_ROWS) and data["contexts"] == [68]
    recall = runner.invoke(app, [*args[:5], "68", "--passkey", "none", "--max-tokens", "136", "--json", "--recall", "4"])
    assert recall.exit_code == 0, recall.output
    assert set(json.loads(recall.stdout)["rows"]) == {*DEFAULT_ROWS, "linearized_recall"}
    helped = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    out = helped.output
    assert out.index("--json") < out.index("Examples") < out.rindex("lolcats eval runs/")  # help ends with examples


def test_cli_footer_mentions_passkey_only_when_it_ran(run_dir, text_file):
    app = typer.Typer()
    register_commands(app, [("eval", "eval"), ("plugins", "plugins")])
    runner = CliRunner()
    args = ["eval", str(run_dir), "--text", str(text_file), "--contexts", "68", "--max-tokens", "136",
            "--device", "cpu"]
    off = runner.invoke(app, [*args, "--passkey", "none"], terminal_width=200)
    assert off.exit_code == 0, off.output
    assert "passkey" not in off.stdout and "prompts per length" not in off.stdout, off.stdout
    assert "seed 0" in off.stdout
    on = runner.invoke(app, [*args, "--passkey", "256", "--passkey-n", "1"], terminal_width=200)
    assert on.exit_code == 0, on.output
    assert "passkey 1 prompts per length" in on.stdout


def test_the_recall_hint_appears_when_the_linearized_row_misses_passkeys_and_no_recall_row_ran():
    from lolcats_cli.cli.eval import recall_hint
    from lolcats_cli.core.eval.evaluate import EvalReport, RowResult

    def report(rows: dict[str, dict[int, float]]) -> EvalReport:
        return EvalReport("runs/x", "run", "heldout.txt", 10, [], sorted({n for r in rows.values() for n in r}), 10, 0,
                          [], None, {name: RowResult(name, passkey=hits) for name, hits in rows.items()})  # fmt: skip

    hint = recall_hint(report({"teacher": {1024: 1.0, 2048: 1.0}, "linearized": {1024: 0.6, 2048: 0.1}}))
    assert hint is not None and hint.startswith("passkey@2048 under 50%") and "--recall 64" in hint
    assert recall_hint(report({"linearized": {1024: 0.5, 2048: 0.9}})) is None  # it finds them
    assert recall_hint(report({"linearized": {2048: 0.0}, "linearized_recall": {2048: 0.6}})) is None  # asked already
    assert recall_hint(report({"teacher": {2048: 1.0}})) is None  # a plain model: no linearized row
