"""``lolcats init``: flags and --yes (in-process), the rendered recipe, and the wizard through a pseudo-terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lolcats_cli.cli.main import main
from lolcats_cli.core.model.registry import list_plugins
from lolcats_cli.core.recipe.init_recipe import (
    InitAnswers,
    format_tokens,
    parse_tokens,
    render_recipe,
    resolve_answers,
    write_recipe,
)
from lolcats_cli.core.recipe.recipe import Recipe, load_recipe
from lolcats_cli.errors import ConfigError, LolcatsError

NEXT = ["lolcats transfer --recipe {path}", "lolcats finetune {run}", "lolcats eval {run}", "lolcats chat {run}"]


def run_init(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``lolcats init ARGS`` in-process in ``cwd`` (stdin is not a terminal under pytest): (code, out, err)."""
    monkeypatch.chdir(cwd)
    try:
        main(["init", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, re.sub(r"[│╭╮╰╯─]", " ", err)


def _keys(d: dict, prefix: str = "") -> set[str]:
    return {f"{prefix}{k}" for k in d} | {x for k, v in d.items() if isinstance(v, dict) and not k.endswith("_params")
                                          for x in _keys(v, f"{prefix}{k}.")}


# ------------------------------------------------------------------------------------------ non-interactive
def test_yes_writes_the_embedded_default(tmp_path, capsys, monkeypatch) -> None:
    code, out, err = run_init(["--yes"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    recipe = load_recipe(tmp_path / "recipe.yaml")
    default = resolve_answers(InitAnswers())
    attention = recipe.attention
    assert (recipe.model.name, attention.feature_map, attention.window) == ("smollm2-135m", "hedgehog", "terrace")
    assert (recipe.attention.window_params["size"], recipe.data.dataset) == (64, "pydoc")
    assert recipe.transfer.max_tokens == recipe.finetune.max_tokens == default.tokens
    assert recipe.output.dir == "runs/smollm2-135m"
    text = (tmp_path / "recipe.yaml").read_text()
    for line in NEXT:
        command = line.format(path="recipe.yaml", run="runs/smollm2-135m")
        assert command in out and f"#   {command}" in text
    assert "wrote recipe.yaml" in out and err == ""


def test_flags_appear_in_the_recipe(tmp_path, capsys, monkeypatch) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("hello\n" * 100)
    args = ["sub/my.yaml", "--model", "meta-llama/Llama-3.2-1B", "--feature-map", "taylor", "--window", "sliding",
            "--window-size", "32", "--dataset", str(data), "--tokens", "1.5M", "--lora-rank", "4",
            "--output", "runs/mine", "--seq-len", "256", "--yes"]
    code, out, err = run_init(args, tmp_path, capsys, monkeypatch)
    assert code == 0, err
    r = load_recipe(tmp_path / "sub" / "my.yaml")
    assert r.model.name == "meta-llama/Llama-3.2-1B"
    assert (r.attention.feature_map, r.attention.feature_map_params) == ("taylor", {})
    assert (r.attention.window, r.attention.window_params) == ("sliding", {"size": 32})
    assert (r.data.dataset, r.data.seq_len, r.output.dir) == (str(data), 256, "runs/mine")
    assert r.transfer.max_tokens == r.finetune.max_tokens == 1_500_000
    assert (r.transfer.max_steps, r.finetune.max_steps) == (None, None)  # the token budget is the cap
    assert (r.finetune.lora.rank, r.finetune.lora.alpha) == (4, 8.0)  # alpha / rank kept at the paper's 2
    assert "lolcats finetune runs/mine" in out


def test_every_section_and_key_is_present_and_commented(tmp_path) -> None:
    text = render_recipe(InitAnswers(window="none", dataset="yahma/alpaca-cleaned"), tmp_path / "r.yaml")
    assert _keys(yaml.safe_load(text)) == _keys(Recipe().to_dict())
    lines = text.splitlines()
    assert all(lines[i - 1].lstrip().startswith("#") for i, line in enumerate(lines)
               if line.strip() and not line.lstrip().startswith("#"))
    Recipe.from_dict(yaml.safe_load(text))  # plain yaml.safe_load reads it too


@pytest.mark.parametrize("kind", ["feature_map", "window"])
def test_every_installed_plugin_renders_a_valid_recipe(kind, tmp_path) -> None:
    for plugin in list_plugins(kind):
        text = render_recipe(InitAnswers(**{kind: plugin.name}), "r.yaml")
        assert getattr(Recipe.from_dict(yaml.safe_load(text)).attention, kind) == plugin.name


def test_bad_flags_fail_clearly_and_write_nothing(tmp_path, capsys, monkeypatch) -> None:
    code, _, err = run_init(["--yes", "--feature-map", "hedgehg", "--window-size", "0", "--lora-rank", "-2"],
                            tmp_path, capsys, monkeypatch)
    assert code == 2
    assert "--feature-map: unknown feature map 'hedgehg'" in err and "did you mean 'hedgehog'" in err
    assert "--window-size: window size must be an integer >= 1, got 0" in err
    assert "--lora-rank" in err
    code, _, err = run_init(["--yes", "--tokens", "lots"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "--tokens" in err and "'lots'" in err and "20M" in err
    code, _, err = run_init(["--yes", "--dataset", "missing.jsonl"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "--dataset: data file 'missing.jsonl' does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_force(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "recipe.yaml").write_text("mine\n")
    code, _, err = run_init(["--yes"], tmp_path, capsys, monkeypatch)
    assert code == 1 and "recipe.yaml already exists" in err and "--force" in err
    assert (tmp_path / "recipe.yaml").read_text() == "mine\n"
    code, _, err = run_init(["--yes", "--force", "--window", "sliding"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    assert load_recipe(tmp_path / "recipe.yaml").attention.window == "sliding"


def test_without_a_terminal_it_uses_flags_and_defaults(tmp_path, capsys, monkeypatch) -> None:
    code, out, err = run_init(["--lora-rank", "16"], tmp_path, capsys, monkeypatch)
    assert code == 0 and "not a terminal" in err and "--yes" in err
    assert load_recipe(tmp_path / "recipe.yaml").finetune.lora.rank == 16


def test_help_ends_with_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    out = capsys.readouterr().out
    assert out.index("Examples") > out.index("--force")
    assert "lolcats init --yes" in out


def test_init_imports_no_torch(tmp_path) -> None:
    code = ("import sys\nfrom lolcats_cli.cli.main import main\ntry:\n    main(['init', '--yes'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------------------------ core helpers
@pytest.mark.parametrize("text,n", [("20M", 20_000_000), ("500k", 500_000), ("1.5B", 1_500_000_000),
                                    ("2_000_000", 2_000_000), ("2,000", 2000), (64, 64)])
def test_parse_and_format_tokens(text, n) -> None:
    assert parse_tokens(text) == n
    assert parse_tokens(format_tokens(n)) == n


@pytest.mark.parametrize("bad", ["", "0", "-5", "ten", "3X"])
def test_parse_tokens_rejects(bad) -> None:
    with pytest.raises(ConfigError, match="token budget"):
        parse_tokens(bad)


def test_write_recipe(tmp_path) -> None:
    path = write_recipe(tmp_path / "a" / "r.yaml", "x: 1\n")
    with pytest.raises(LolcatsError, match="already exists") as info:
        write_recipe(path, "x: 2\n")
    assert "--force" in str(info.value) and path.read_text() == "x: 1\n"
    assert write_recipe(path, "x: 2\n", overwrite=True).read_text() == "x: 2\n"
    with pytest.raises(LolcatsError, match="is a directory"):
        write_recipe(tmp_path, "x: 1\n")


# ------------------------------------------------------------------------------------------ the wizard (pty)
DOWN, ENTER, CTRL_C, CLEAR = "\x1b[B", "\r", "\x03", "\x15"  # arrow down, Enter, Ctrl-C, Ctrl-U (clear line)


def spawn(args: list[str], cwd: Path):
    """``python -m lolcats_cli init ARGS`` on a pseudo-terminal."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    child = pexpect.spawn(sys.executable, ["-m", "lolcats_cli", "init", *args], cwd=str(cwd), env=env,
                          encoding="utf-8", timeout=90, dimensions=(40, 160))
    return child, pexpect


def test_wizard_answers_each_question(tmp_path) -> None:
    names = [p.name for p in list_plugins("feature_map")]
    expected_fm = names[(names.index("hedgehog") + 1) % len(names)]  # one arrow down from the default
    child, pexpect = spawn([], tmp_path)
    child.expect("Base model")
    child.send(ENTER)
    child.expect("Feature map")
    child.expect(r"hedgehog\s+\(lolcats ")  # each choice shows its distribution
    child.send(DOWN + ENTER)
    child.expect("Softmax window")
    child.send(ENTER)
    child.expect("Window size")
    child.send(CLEAR + "32" + ENTER)
    child.expect("Training data")
    child.send(ENTER)
    child.expect("Token budget")
    child.send(CLEAR + "500k" + ENTER)
    child.expect("LoRA rank")
    child.send(CLEAR + "0" + ENTER)  # rejected in place: the question stays
    child.expect("LoRA rank must be an integer >= 1")
    child.send(CLEAR + "16" + ENTER)
    child.expect("Run directory")
    child.send(ENTER)
    child.expect("Save the recipe as")
    child.send(CLEAR + "wiz.yaml" + ENTER)
    child.expect("lolcats transfer --recipe wiz.yaml")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    r = load_recipe(tmp_path / "wiz.yaml")
    assert (r.model.name, r.attention.feature_map, r.attention.window) == ("smollm2-135m", expected_fm, "terrace")
    assert (r.attention.window_params["size"], r.transfer.max_tokens, r.finetune.lora.rank) == (32, 500_000, 16)
    assert r.output.dir == "runs/smollm2-135m"


def test_wizard_skips_questions_given_as_flags(tmp_path) -> None:
    child, pexpect = spawn(["given.yaml", "--model", "meta-llama/Llama-3.1-8B", "--feature-map", "elu",
                            "--window", "sliding", "--window-size", "16", "--dataset", "pydoc", "--tokens", "1M",
                            "--output", "runs/l"], tmp_path)
    child.expect("LoRA rank")
    assert "Base model" not in child.before and "Feature map" not in child.before
    child.send(ENTER)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    r = load_recipe(tmp_path / "given.yaml")
    assert (r.model.name, r.attention.feature_map, r.output.dir) == ("meta-llama/Llama-3.1-8B", "elu", "runs/l")


def test_wizard_ctrl_c_exits_130_and_writes_nothing(tmp_path) -> None:
    child, pexpect = spawn(["c.yaml"], tmp_path)
    child.expect("Base model")
    child.send(ENTER)
    child.expect("Feature map")
    child.send(CTRL_C)
    child.expect("nothing written")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert list(tmp_path.iterdir()) == []


def test_wizard_asks_before_replacing_a_file(tmp_path) -> None:
    (tmp_path / "r.yaml").write_text("mine\n")
    child, pexpect = spawn(["r.yaml"], tmp_path)
    child.expect("r.yaml exists. Replace it?")
    child.send("n")
    child.expect("nothing written")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and (tmp_path / "r.yaml").read_text() == "mine\n"
