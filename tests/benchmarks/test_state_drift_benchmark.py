"""benchmarks/state_drift.py: the same decode with S in fp32 twice gives the same outputs; with S in bf16 they
differ by the format's rounding, not more."""

from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
def test_drift_is_zero_in_fp32_and_rounding_in_bf16(decay: bool) -> None:
    bench = load_benchmark("state_drift")
    same = bench.drift(300, 1.0, decay, torch.float32)
    half = bench.drift(300, 1.0, decay, torch.bfloat16)
    assert [(r["from"], r["to"]) for r in half] == [(0, 300)]
    assert same[0]["rel_rms"] == 0
    assert 0 < half[0]["rel_rms"] < 4 * torch.finfo(torch.bfloat16).eps
