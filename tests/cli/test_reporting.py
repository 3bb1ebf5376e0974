"""The CLI's progress reporting: the ETA estimator (a pure function) and what the reporter prints."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lolcats_cli.cli.reporting import RichReporter, estimate_eta, format_eta, status
from lolcats_cli.core.progress import EvalInfo, StepInfo, phase, set_phase_handler


def test_eta_is_none_before_the_first_step_and_zero_at_the_end() -> None:
    assert estimate_eta([], [], 0, 200) is None
    assert estimate_eta([3.0], [], 200, 200) == 0.0


def test_eta_counts_the_remaining_steps_at_the_recent_step_time() -> None:
    assert estimate_eta([10.0] * 5, [], 5, 200) == pytest.approx(195 * 10.0)
    # a slow start (warm-up, a busy machine) leaves the 20-step window
    assert estimate_eta([100.0] * 10 + [10.0] * 20, [], 30, 200) == pytest.approx(170 * 10.0)
    assert estimate_eta([100.0] * 10 + [10.0] * 20, [], 30, 200, window=30) == pytest.approx(170 * 40.0)


def test_eta_adds_the_evaluations_still_to_come() -> None:
    # the run: step 55/200, ~10 s per step, an evaluation every 50 steps costing 5 minutes; evaluations
    # at 100, 150 and 200 remain. Rich's column showed 0:04:36 there.
    eta = estimate_eta([10.0] * 20, [(50, 300.0)], 55, 200)
    assert eta == pytest.approx(145 * 10.0 + 3 * 300.0)
    assert format_eta(eta) == "0:39:10"
    # at step 100 its evaluation is about to run: it counts
    assert estimate_eta([10.0] * 20, [(50, 300.0)], 100, 200) == pytest.approx(100 * 10.0 + 3 * 300.0)
    # a last step that is no multiple of eval_every still evaluates; the mean of the last three costs
    assert estimate_eta([1.0], [(50, 10.0), (100, 20.0), (150, 30.0), (200, 60.0)], 210, 220) == pytest.approx(
        10 * 1.0 + 1 * (20.0 + 30.0 + 60.0) / 3)
    # a resumed run whose first evaluations are at 100 and 150: eval_every is their gcd, 50
    assert estimate_eta([1.0], [(100, 5.0), (150, 5.0)], 160, 200) == pytest.approx(40 + 1 * 5.0)


def test_format_eta() -> None:
    assert format_eta(None) == "-:--:--" and format_eta(float("nan")) == "-:--:--"
    assert format_eta(3 * 3600 + 61.4) == "3:01:01"


def test_plain_progress_lines_carry_the_eta_and_no_nan_loss() -> None:
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, width=200, force_terminal=False))
    reporter.start("eval", 2, 0)
    reporter.step(StepInfo(2, 2, 1000, 50.0, float("nan"), 0.0))
    reporter.evaluated(EvalInfo(2, 0.5, True))
    reporter.finish()
    text = out.getvalue()
    assert "step 2/2 · 1,000 tok · 50 tok/s · ETA 0:00:00" in text and "nan" not in text


def test_phases_show_through_the_handler_and_a_plain_line_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    before = set_phase_handler(lambda message: status(message, console))
    try:
        with phase("reading x.gguf (70 MB)"):
            pass
        set_phase_handler(None)
        with phase("not shown"):
            pass
    finally:
        set_phase_handler(before)
    assert out.getvalue() == "reading x.gguf (70 MB)\n"


def test_a_gguf_not_yet_cached_is_read_under_a_named_phase(tmp_path, monkeypatch) -> None:
    from lolcats_cli.core.model import gguf_cache
    from lolcats_cli.core.model.models import _first_gguf_load

    monkeypatch.setenv("LOLCATS_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(2 * 2**20))
    seen: list[str] = []
    before = set_phase_handler(lambda message: (seen.append(message), phase_none())[1])
    try:
        with _first_gguf_load(gguf):
            pass
        folder = gguf_cache.cache_dir(gguf)
        folder.mkdir(parents=True)
        (folder / gguf_cache.COMPLETE).write_text("x")
        with _first_gguf_load(gguf):  # cached: nothing to show
            pass
    finally:
        set_phase_handler(before)
    assert seen == ["reading tiny.gguf (2 MB) and dequantizing it to fp32 and caching it (later loads take seconds)"]


def phase_none():
    import contextlib

    return contextlib.nullcontext()


def test_transformers_loading_bars_hide_unless_debug(tiny_model_dir, capfd) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    from lolcats_cli.core.model.models import load_model
    from lolcats_cli.core.progress import show_library_bars
    from lolcats_cli.core.recipe.recipe import ModelConfig
    from lolcats_cli.hf_compat import quiet_progress_bars

    bar = gguf_loader.tqdm
    try:
        show_library_bars(False)  # what `lolcats ...` does without --debug
        capfd.readouterr()
        load_model(ModelConfig(name=str(tiny_model_dir)), device="cpu")
        assert "Loading weights" not in capfd.readouterr().err
        show_library_bars(True)  # --debug, and the library's default
        load_model(ModelConfig(name=str(tiny_model_dir)), device="cpu")
        assert "Loading weights" in capfd.readouterr().err
    finally:
        show_library_bars(True)
    with quiet_progress_bars():
        assert gguf_loader.tqdm is not bar and gguf_loader.tqdm.keywords == {"disable": True}
    assert gguf_loader.tqdm is bar
