"""The fused Triton decode step (kernels/triton_step.py) against static_step (kernels/static.py), the reference: the
output of every step and every state buffer (rings, sinks, S, z, length) after each of several consecutive steps,
fp32, for sliding and terrace windows, 0 or 4 sinks, with and without a decay and a linear gate, grouped-query and
plain multi-head attention, unpadded and left-padded rows, from an empty state and after a prefill, past the
point where keys leave the window. Then the static decoder of a converted tiny Llama through the Triton step
generates what ``model.generate`` does, and the checks that keep other windows on static_step.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, see tests/triton_interp.py) at small
sizes; on a CUDA machine with it unset they run compiled on the GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from triton_interp import DEVICE, ON_GPU  # sets TRITON_INTERPRET=1 without a GPU, before triton is imported

pytest.importorskip("triton")

from lolcats_cli.api import WindowParams  # noqa: E402
from lolcats_cli.builtins.windows import Sliding, Terrace  # noqa: E402
from lolcats_cli.kernels.blocks import expand_kv  # noqa: E402
from lolcats_cli.kernels.padded import padded_prefill_state  # noqa: E402
from lolcats_cli.kernels.recurrent import HybridState  # noqa: E402
from lolcats_cli.kernels.static import StaticState, fold_width, static_step  # noqa: E402
from lolcats_cli.kernels.triton_step import (  # noqa: E402
    ENV,
    fused_key_map,
    triton_step,
    triton_step_enabled,
    triton_step_problem,
)

from kernel_inputs import D, DV, F_HALF, H, make_inputs, sliced  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "triton_interpreter")
LOG_DECAY = -1.0 / torch.tensor([3.0, 10.0, 40.0, 200.0])
BUFFERS = ("k_ring", "v_ring", "k_sink", "v_sink", "S", "z", "length", "pads", "s_log")


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # sliding or terrace, size 3
    sinks: int
    decay: bool
    gate: bool  # a per-head linear gate folded into phi_q (what converted layers with linear_gate do)
    pads: tuple[int, int]
    prompt: int  # tokens prefilled before the steps (0: an empty state)
    steps: int
    gqa: bool = True  # H=4 query heads over 2 KV heads; False: K and V repeated to 4 heads

    def __str__(self) -> str:
        return (f"{self.kind}-sinks{self.sinks}-{'decay' if self.decay else 'nodecay'}-{'gate' if self.gate else 'nogate'}"
                f"-pads{self.pads[1]}-prompt{self.prompt}-{'gqa' if self.gqa else 'mha'}")  # fmt: skip


# Ring spans: 3 (sliding), 6 (terrace); every case runs past its span, so keys leave the window during the steps.
CASES = [
    Case("sliding", 0, False, False, (0, 0), 0, 7),
    Case("sliding", 4, True, True, (0, 3), 6, 7),
    Case("sliding", 0, False, True, (1, 4), 7, 5, gqa=False),
    Case("terrace", 0, True, False, (0, 2), 5, 8),
    Case("terrace", 4, False, True, (0, 0), 0, 12),  # the sinks fill up from empty, then a block of 2 folds
    Case("terrace", 4, True, False, (0, 5), 9, 7, gqa=False),
]


def _inputs(case: Case, s_dtype: torch.dtype | None = None) -> tuple[dict, StaticState, StaticState]:
    """The inputs of prompt + steps positions on DEVICE (gate folded into phi_q) and two copies of the state after
    the prompt (ring layout; S in ``s_dtype``)."""
    x = make_inputs(case.prompt + case.steps, seed=3)
    if not case.gqa:
        x["k"], x["v"] = expand_kv(x["k"], H), expand_kv(x["v"], H)
    x = {n: t.to(DEVICE) if isinstance(t, (torch.Tensor, torch.nn.Module)) else t for n, t in x.items()}
    if case.gate:
        gate = F.softplus(torch.randn(H, generator=torch.Generator().manual_seed(4))).to(DEVICE).view(1, H, 1, 1)
        phi = x["phi_q"]
        x["phi_q"] = lambda q: phi(q) * gate
    window = (Sliding if case.kind == "sliding" else Terrace)(WindowParams(size=3, sinks=case.sinks))
    x["window"], x["log_decay"] = window, LOG_DECAY.to(DEVICE) if case.decay else None
    pads = torch.tensor(case.pads, device=DEVICE)
    hkv = x["k"].shape[1]
    with torch.no_grad():
        if case.prompt:
            p = sliced(x, 0, case.prompt)
            state = padded_prefill_state(p["k"], p["v"], x["phi_k"], window, pads, H, log_decay=x["log_decay"])
        else:
            state = HybridState.empty(2, H, hkv, D, DV, 2 * F_HALF, window.span, device=DEVICE, sinks=case.sinks)
    return x, *(StaticState.from_hybrid(state, pads, s_dtype=s_dtype) for _ in range(2))


def _both_steps(case: Case, x: dict, ref: StaticState, fused: StaticState, tol: float, buffers=BUFFERS,
                q_map: tuple | None = None) -> None:  # fmt: skip
    """Every position after the prompt through static_step (``ref``) and triton_step (``fused``): the outputs and
    the ``buffers`` agree to ``tol`` after each step. With ``q_map`` triton_step gets it and no phi_q."""
    window, fold = x["window"], fold_width(x["window"])
    with torch.no_grad():
        for t in range(case.prompt, case.prompt + case.steps):
            s = sliced(x, t, t + 1)
            args = (s["q"], s["k"], s["v"], x["phi_q"], x["phi_k"], x["window_logits"], window)
            want = static_step(*args, ref, log_decay=x["log_decay"], fold=fold)
            mine = args if q_map is None else (*args[:3], None, *args[4:])  # the kernel must not need phi_q
            got = triton_step(*mine, fused, log_decay=x["log_decay"], fold=fold, q_map=q_map)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"y at position {t}")
            for name in buffers:
                a, b = getattr(fused, name), getattr(ref, name)
                assert (a is None) == (b is None), name
                if a is not None:
                    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=f"{name} after {t}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_triton_step_equals_static_step_step_by_step(case: Case) -> None:
    x, ref, fused = _inputs(case)
    assert case.prompt + case.steps > x["window"].span + case.sinks  # keys leave the window during the run
    S0 = fused.S.clone()
    _both_steps(case, x, ref, fused, 1e-5)
    assert int(fused.length) == case.prompt + case.steps
    assert not torch.equal(fused.S, S0)  # the fold (or the decay) ran


def _hedgehog(seed: int) -> torch.nn.Module:
    """The built-in hedgehog map at the test sizes, with random weights (not the identity it starts from)."""
    from lolcats_cli.builtins.feature_maps import Hedgehog, HedgehogParams

    fm = Hedgehog(H, D, HedgehogParams(feature_dim=F_HALF))
    with torch.no_grad():
        fm.weight.copy_(torch.randn(H, D, F_HALF, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return fm.to(DEVICE)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5]], ids=str)
def test_the_step_computes_the_builtin_hedgehog_key_features_itself(case: Case) -> None:
    """With the built-in hedgehog map as phi_k the step maps the leaving keys inside the kernel (no gather, no
    PyTorch call) and still equals static_step, which calls the map, step by step; a subclass or any other
    callable keeps the PyTorch call."""
    from lolcats_cli.builtins.feature_maps import Hedgehog

    x, ref, fused = _inputs(case)
    x["phi_k"] = _hedgehog(9)
    assert fused_key_map(x["phi_k"], 2 * F_HALF) is not None
    assert fused_key_map(lambda t: x["phi_k"](t), 2 * F_HALF) is None
    assert fused_key_map(type("MyHedgehog", (Hedgehog,), {})(H, D), 2 * 64) is None
    assert fused_key_map(x["phi_k"], 4 * F_HALF) is None  # the state's feature count must match
    S0 = fused.S.clone()
    _both_steps(case, x, ref, fused, 1e-5)
    assert not torch.equal(fused.S, S0)


@pytest.mark.parametrize("gate", [False, True], ids=["no-gate", "gate"])
def test_the_step_computes_the_builtin_hedgehog_query_features_itself(gate: bool) -> None:
    """``q_map`` (what the static decoder passes for a hedgehog query map): the kernel computes
    ``hedgehog(q) * gate`` itself and equals static_step calling the map, step by step; hedgehog keys too."""
    from lolcats_cli.kernels.triton_step import fused_query_map

    case = Case("terrace", 4, True, False, (0, 3), 6, 8)
    x, ref, fused = _inputs(case)
    fm_q, x["phi_k"] = _hedgehog(11), _hedgehog(12)
    g = F.softplus(torch.randn(H, generator=torch.Generator().manual_seed(13))).to(DEVICE) if gate else None
    x["phi_q"] = (lambda t: fm_q(t) * g.view(1, H, 1, 1)) if gate else fm_q
    q_map = fused_query_map(fm_q, g, 2 * F_HALF)
    assert q_map is not None and fused_query_map(lambda t: fm_q(t), g, 2 * F_HALF) is None
    _both_steps(case, x, ref, fused, 1e-5, q_map=q_map)


# The interpreter rounds bf16 stores its own way (numpy has no bf16): bf16 runs on a GPU only, fp16 everywhere.
HALF = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


@pytest.mark.parametrize("s_dtype", HALF, ids=[str(d).split(".")[-1] for d in HALF])
def test_a_half_precision_s_steps_like_the_static_step(s_dtype: torch.dtype) -> None:
    """S kept in fp16 / bf16: the fused step computes in fp32 from the same stored S and rounds it once per step,
    as static_step does (a rounding boundary may fall 1 unit apart: outputs and S to 2 units of the format)."""
    case = Case("terrace", 4, True, True, (0, 3), 9, 10)
    x, ref, fused = _inputs(case, s_dtype)
    _both_steps(case, x, ref, fused, 2 * torch.finfo(s_dtype).eps, buffers=("S", "z", "k_ring", "length"))
    assert fused.S.dtype == ref.S.dtype == s_dtype


def test_a_step_without_leaving_keys_or_decay_leaves_s_and_z_alone() -> None:
    """Terrace, no decay: between block boundaries no key leaves and the step writes neither S nor z."""
    x, ref, fused = _inputs(Case("terrace", 0, False, False, (0, 0), 7, 1))
    S, z = fused.S.clone(), fused.z.clone()
    s = sliced(x, 7, 8)  # position 7: the fold boundary stays at 3 (start(7) = start(8) = 3)
    with torch.no_grad():
        triton_step(s["q"], s["k"], s["v"], x["phi_q"], x["phi_k"], x["window_logits"], x["window"], fused, fold=3)
    assert torch.equal(fused.S, S) and torch.equal(fused.z, z) and int(fused.length) == 8


def test_with_a_decay_a_step_without_leaving_keys_leaves_s_alone_and_defers_the_decay() -> None:
    """Terrace with a decay, between block boundaries: both steps leave S untouched and add log_decay to s_log
    (z, small, is decayed in place); the state they describe is the eager recurrent form's, decayed by one step."""
    case = Case("terrace", 4, True, False, (0, 2), 7, 1)
    x, ref, fused = _inputs(case)
    S, s_log, before = fused.S.clone(), fused.s_log.clone(), ref.to_hybrid()
    s = sliced(x, 7, 8)
    args = (s["q"], s["k"], s["v"], x["phi_q"], x["phi_k"], x["window_logits"], x["window"])
    with torch.no_grad():
        static_step(*args, ref, log_decay=x["log_decay"], fold=fold_width(x["window"]))
        triton_step(*args, fused, log_decay=x["log_decay"], fold=fold_width(x["window"]))
    for state in (ref, fused):
        assert torch.equal(state.S, S)
        torch.testing.assert_close(state.s_log, s_log + x["log_decay"][None])
        torch.testing.assert_close(state.to_hybrid().S, before.S * x["log_decay"].exp()[None, :, None, None])


def test_windows_and_states_the_step_does_not_take() -> None:
    from lolcats_cli.builtins.windows import NoWindow

    _, _, state = _inputs(Case("sliding", 0, False, False, (0, 0), 0, 1))
    device = torch.device(DEVICE)
    assert triton_step_problem(Sliding(WindowParams(size=3)), state, device) is None
    assert "not a built-in sliding or terrace" in triton_step_problem(NoWindow(), state, device)
    assert "sink buffers" in triton_step_problem(Sliding(WindowParams(size=3, sinks=2)), state, device)
    with pytest.raises(ValueError, match="does not support"):
        q = torch.zeros(2, H, 1, D, device=DEVICE)
        triton_step(q, q[:, :2], q[:, :2, :, :DV], None, None, torch.zeros(H), NoWindow(), state)


def test_the_step_is_the_cuda_default_and_the_environment_variable_switches_it(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert triton_step_enabled("cuda") and not triton_step_enabled("cpu") and not triton_step_enabled()
    monkeypatch.setenv(ENV, "off")
    assert not triton_step_enabled("cuda")
    monkeypatch.setenv(ENV, "1")
    assert triton_step_enabled("cpu") and triton_step_enabled("cuda")
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match=r"LOLCATS_TRITON_STEP='fast'.*set it to 1 \(on\) or 0 \(off\)"):
        triton_step_enabled("cuda")


def test_the_static_decoder_generates_through_the_triton_step(tiny_model_dir, monkeypatch) -> None:
    """A converted tiny Llama (terrace window, sinks, decay, linear gate), left-padded batch: the static loop with
    the Triton step in every layer gives generate()'s tokens; LOLCATS_TRITON_STEP=0 puts static_step back."""
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.decode.static_decode import decoder_for, static_sample
    from lolcats_cli.core.model.convert import convert_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(DEVICE).eval()
    model = convert_model(model, window="terrace", window_params={"size": 4, "sinks": 2}, decay=True,
                          linear_gate=True)  # fmt: skip
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    greedy = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=False, temperature=None,
                  top_p=None, top_k=None)  # fmt: skip
    monkeypatch.setenv(ENV, "1")  # on any device the kernels run on (without a GPU, the interpreter)
    with torch.inference_mode():
        want = model.generate(input_ids=ids, **greedy)
        got = model.generate(input_ids=ids, custom_generate=static_sample, **greedy)
    assert torch.equal(got, want)
    assert decoder_for(model, 2).step_name == "triton"
    monkeypatch.setenv(ENV, "0")  # a new decoder (on CUDA its graph was captured over the Triton kernels)
    with torch.inference_mode():
        assert torch.equal(model.generate(input_ids=ids, custom_generate=static_sample, **greedy), want)
    assert decoder_for(model, 2).step_name == "torch"
