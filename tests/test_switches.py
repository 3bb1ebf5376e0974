"""The LOLCATS_* on/off switches: one reader (switches.switch) for their spellings, and one clear error naming the
value and the fix for anything else, where each switch is read."""

from __future__ import annotations

import pytest
import torch

from lolcats_cli.core.decode.static_decode import static_decode_enabled
from lolcats_cli.switches import switch


@pytest.mark.parametrize("value, want", [("1", True), ("on", True), (" Yes ", True), ("TRUE", True), ("0", False),
                                         ("off", False), ("No", False), ("", None)])  # fmt: skip
def test_switch_reads_every_spelling(monkeypatch, value, want):
    monkeypatch.setenv("LOLCATS_TEST_SWITCH", value)
    assert switch("LOLCATS_TEST_SWITCH", "off") is want
    monkeypatch.delenv("LOLCATS_TEST_SWITCH")
    assert switch("LOLCATS_TEST_SWITCH", "off") is None


def test_a_value_that_is_not_a_switch_names_itself_and_the_fix(monkeypatch):
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "cuda")
    with pytest.raises(ValueError, match=r"LOLCATS_STATIC_DECODE='cuda' is not a switch: set it to 1 \(on\) or 0 "
                                         r"\(off\), or unset it \(on for CUDA devices\)"):  # fmt: skip
        static_decode_enabled(torch.device("cpu"))
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "1")
    assert static_decode_enabled(torch.device("cpu"))
    monkeypatch.setenv("LOLCATS_STATIC_DECODE", "0")
    assert not static_decode_enabled(torch.device("cuda"))
    monkeypatch.delenv("LOLCATS_STATIC_DECODE")
    assert static_decode_enabled(torch.device("cuda")) and not static_decode_enabled(torch.device("cpu"))
