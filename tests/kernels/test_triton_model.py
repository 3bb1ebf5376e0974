"""The fused Triton kernel inside a converted model: a left-padded batch of prompts of different lengths, prefilled
through a transformers cache and decoded on, gives the logits the chunked kernel gives (the pads as the model's
cache layer hands them to ``Kernel.prefill`` and ``Kernel.step``). Without a GPU the kernels run in Triton's
interpreter; on a CUDA machine with ``TRITON_INTERPRET`` unset, compiled.
"""

from __future__ import annotations

import pytest
import torch

from triton_interp import DEVICE  # sets TRITON_INTERPRET=1 without a GPU, before triton is imported

pytest.importorskip("triton")

from lolcats_cli.kernels import KERNELS  # noqa: E402
from lolcats_cli.kernels.triton_hybrid import TritonKernel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "triton_interpreter")


class Interpreted(TritonKernel):
    """The Triton kernel, taken as available on this device (the interpreter runs it on CPU tensors)."""

    name = "triton-here"
    priority = -1

    def available(self, device: torch.device) -> bool:
        return True


def _model():
    import transformers

    from lolcats_cli.core.model.convert import convert_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                                   intermediate_size=128, vocab_size=96, max_position_embeddings=512)  # head dim 64
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(DEVICE).eval()
    # a sliding window folds keys into S between block starts; the linear branch at full weight, so S matters
    return convert_model(model, feature_map="hedgehog", feature_map_params={"feature_dim": 16}, window="sliding",
                         window_params={"size": 64, "sinks": 4}, linear_gate=False, decay=True)  # fmt: skip


def _prefill_and_decode(model, kernel, ids, mask, steps: int = 3) -> torch.Tensor:
    from transformers import DynamicCache

    from lolcats_cli.core.model.linear_attention import linearized_layers
    from lolcats_cli.hf_compat import cache_kwarg

    for _, layer in linearized_layers(model):
        layer.kernel = kernel
    kwargs = {cache_kwarg(model): DynamicCache(), "use_cache": True}
    out = [model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]]
    for t in range(steps):
        nxt = (ids[:, -1:] + t + 1) % model.config.vocab_size
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out.append(model(input_ids=nxt, attention_mask=mask, **kwargs).logits[:, -1])
    return torch.stack(out, dim=1)


def test_a_left_padded_batch_prefills_and_decodes_as_through_the_chunked_kernel(monkeypatch) -> None:
    from lolcats_cli.kernels import triton_hybrid

    launches: list[int] = []
    forward = triton_hybrid._forward
    monkeypatch.setattr(triton_hybrid, "_forward", lambda *a, **kw: launches.append(1) or forward(*a, **kw))
    model = _model()
    T, pads = 200, (0, 57)  # rows of 200 and 143 tokens: fold points 137 and 80, in different 64-blocks
    ids = torch.randint(1, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = (torch.arange(T)[None] >= torch.tensor(pads)[:, None]).long().to(DEVICE)
    with torch.no_grad():
        want = _prefill_and_decode(model, KERNELS["chunked"], ids, mask)
        got = _prefill_and_decode(model, Interpreted(), ids, mask)
    assert launches == [1, 1]  # one fused forward per layer, at the prefill
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
