"""The ``lolcats`` command line: the pinned command list, ``lolcats plugins``, and the one error boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from lolcats_cli import __version__
from lolcats_cli.cli.main import app, main, register_commands
from lolcats_cli.core.model import registry

# Pinned: a command added or renamed is a deliberate change to this list.
COMMANDS = ["init", "transfer", "finetune", "eval", "chat", "export", "plugins"]

runner = CliRunner()


def _commands(target: typer.Typer) -> dict[str, click.Command]:
    group = typer.main.get_command(target)
    return group.commands  # type: ignore[attr-defined]


def test_command_list_is_pinned() -> None:
    commands = _commands(app)
    assert sorted(commands) == sorted(COMMANDS)
    broken = [n for n, c in commands.items() if (c.help or "").startswith("Unavailable:")]
    assert broken == []
    out = runner.invoke(app, ["--help"]).output
    for name in COMMANDS + ["--debug", "--version"]:
        assert name in out


def test_help_imports_no_torch() -> None:
    code = ("import sys\nfrom lolcats_cli.cli.main import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "plugins" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_version_and_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "lolcats_cli", "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, f"lolcats {__version__}")


def test_plugins_table() -> None:
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    for word in ("kind", "name", "distribution", "version", "feature_map", "hedgehog", "window", "terrace"):
        assert word in result.output


def test_plugins_json() -> None:
    result = runner.invoke(app, ["plugins", "--json"])
    rows = json.loads(result.stdout)
    assert all(set(r) == {"kind", "name", "distribution", "version", "clashes_with"} for r in rows)
    assert {r["kind"] for r in rows} == {"feature_map", "window"}
    assert {"kind": "feature_map", "name": "hedgehog", "distribution": "lolcats", "version": __version__,
            "clashes_with": []} in rows
    windows = json.loads(runner.invoke(app, ["plugins", "--json", "--kind", "window"]).stdout)
    assert {r["name"] for r in windows} >= {"sliding", "terrace", "none"} and {r["kind"] for r in windows} == {"window"}


def test_plugins_describes_one() -> None:
    result = runner.invoke(app, ["plugins", "hedgehog", "--json"])
    out = json.loads(result.stdout)
    assert out["target"] == "lolcats_cli.builtins.feature_maps:Hedgehog"
    assert out["params"] == [{"name": "feature_dim", "type": "int", "default": 64},
                             {"name": "eps", "type": "float", "default": 1e-12}]


def test_unknown_plugin_is_one_panel_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "hedgehg"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and out == ""
    assert err.count("╭") == 1 and "PluginError" in err and "Traceback" not in err
    assert "did you mean 'hedgehog'?" in err and "lolcats plugins" in err


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--debug", "plugins", "nope"])
    assert exit_.value.code == 1 and "Traceback" in capsys.readouterr().err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "--kind", "model"])
    assert exit_.value.code == 2 and "feature_map, window" in capsys.readouterr().err


def test_unexpected_error_is_short_without_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(kind=None):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(registry, "list_plugins", boom)
    with pytest.raises(SystemExit) as exit_:
        main(["plugins"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "ZeroDivisionError" in err and "--debug" in err and "Traceback" not in err


def test_a_broken_command_module_does_not_break_help() -> None:
    target = typer.Typer(no_args_is_help=True)
    register_commands(target, [("plugins", "plugins"), ("ghost", "no_such_module")])
    assert runner.invoke(target, ["--help"]).exit_code == 0
    assert "Unavailable: ModuleNotFoundError" in (_commands(target)["ghost"].help or "")
    result = runner.invoke(target, ["ghost", "--any", "args"])
    assert "command 'ghost' is unavailable" in str(result.exception)
    assert runner.invoke(target, ["plugins", "--json"]).exit_code == 0


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_shows_examples_once_and_no_placeholder_labels(command: str | None) -> None:
    args = [command, "--help"] if command else ["--help"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    if command is not None:
        assert out.count("Examples") == 1, out
        assert out.index("Examples") > out.index("--help")  # once, after the options
    assert "<bool>" not in out  # flags take no value
    assert "{" not in out and "}" not in out, out  # usage shows RUN_DIR, not {run_dir}
    assert "--help" in out and "Show this message" in out


def test_help_usage_names_arguments_in_capitals() -> None:
    def usage(command: str) -> str:
        out = runner.invoke(app, [command, "--help"], terminal_width=200).output
        return next(line.strip() for line in out.splitlines() if "Usage:" in line)

    assert usage("finetune") == "Usage: lolcats finetune [OPTIONS] RUN_DIR [OVERRIDES]..."
    assert usage("export") == "Usage: lolcats export [OPTIONS] RUN_DIR"
    assert usage("chat") == "Usage: lolcats chat [OPTIONS] RUN_DIR|EXPORT_DIR"
    assert usage("eval") == "Usage: lolcats eval [OPTIONS] [RUN_DIR]"
    out = runner.invoke(app, ["transfer", "--help"], terminal_width=200).output
    assert "<str>" in out and "<path>" in out  # options that take a value keep their type


def test_resume_with_settings_it_would_ignore_is_refused(tmp_path) -> None:
    """--resume reads the run's own recipe: overrides or --model given with it would be silently dropped."""
    result = runner.invoke(app, ["transfer", "--output", str(tmp_path / "run"), "--resume", "transfer.lr=0.5",
                                 "--model", "other-model"], terminal_width=200)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--resume continues the run with its own settings" in text
    assert "transfer.lr=0.5, --model other-model would be ignored" in text
    assert not (tmp_path / "run").exists()  # nothing was made
