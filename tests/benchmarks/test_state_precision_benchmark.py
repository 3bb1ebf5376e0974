"""benchmarks/state_precision.py: teacher-forced decoding through the static decoder scores held-out tokens as the
whole-sequence forward does with S in fp32, and close to it with S in bf16."""

from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark  # tests/ is on sys.path (rootdir conftest)
from tiny_converted import converted_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decoded_nll_matches_the_sequence_form() -> None:
    bench = load_benchmark("state_precision")
    model = converted_model(sinks=4, gate=True, size=8, decay=True)
    rows = torch.randint(0, model.config.vocab_size, (2, 41), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref, ref_logits = bench.decoded_nll(model, rows, 16, 24, None)
        fp32, fp32_logits = bench.decoded_nll(model, rows, 16, 24, torch.float32)
        bf16, _ = bench.decoded_nll(model, rows, 16, 24, torch.bfloat16)
    assert ref.shape == fp32.shape == bf16.shape == (2, 24)
    torch.testing.assert_close(fp32_logits, ref_logits, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(fp32, ref, atol=2e-4, rtol=2e-4)
    assert (bf16.mean() / ref.mean() - 1).abs() < 0.01
