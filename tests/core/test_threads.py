"""torch's thread count: the rule that picks it (core/threads.py) and the line the CLI prints once."""

from __future__ import annotations

import pytest
import torch

from lolcats_cli.cli.main import main
from lolcats_cli.core.threads import apply_threads, choose_threads
from lolcats_cli.errors import ConfigError


@pytest.mark.parametrize(
    ("cpus", "load", "threads"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.7, 1), (2, 6.0, 1), (8, 2.6, 5), (8, None, 8), (4, -1.0, 4)],
)
def test_free_cores_decide(cpus: int, load: float | None, threads: int) -> None:
    n, why = choose_threads(cpus, load, {})
    assert n == threads
    assert (f"leaves {threads} free" in why) if load is not None else ("load unknown" in why)


def test_the_user_decides_first() -> None:
    env = {"LOLCATS_THREADS": "3", "OMP_NUM_THREADS": "2"}
    assert choose_threads(2, 1.5, env, requested=4) == (4, "as --threads asks")
    assert choose_threads(2, 1.5, env) == (3, "as LOLCATS_THREADS asks")
    assert choose_threads(2, 1.5, {"OMP_NUM_THREADS": "2"}) == (None, "OMP_NUM_THREADS=2 is set")  # left alone
    with pytest.raises(ConfigError, match="LOLCATS_THREADS: expected a number of threads >= 1, got 'two'"):
        choose_threads(2, 0.0, {"LOLCATS_THREADS": "two"})
    with pytest.raises(ConfigError, match="--threads: expected a number of threads >= 1, got 0"):
        choose_threads(2, 0.0, {}, requested=0)


def test_apply_sets_torch_and_says_so() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads(1, env={}) == "using 1 thread: as --threads asks"
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        line = apply_threads(env={"OMP_NUM_THREADS": "2"})
        assert torch.get_num_threads() == 2 and line.startswith("using 2 threads: OMP_NUM_THREADS=2 is set")
        assert "override with --threads N or LOLCATS_THREADS=N" in line
    finally:
        torch.set_num_threads(before)


def test_cli_says_it_once_for_commands_that_compute(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            main(["--threads", "1", "eval"])  # fails on its arguments, after the thread line
        err = capsys.readouterr().err
        assert err.count("using 1 thread: as --threads asks") == 1
        with pytest.raises(SystemExit):
            main(["plugins", "nope"])
        assert "using" not in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["transfer", "--help"])  # help runs no model
        assert "using" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
