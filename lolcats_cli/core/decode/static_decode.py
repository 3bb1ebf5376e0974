"""Fast decoding of a converted model: the static state (:mod:`lolcats_cli.kernels.static`) in a cache of its own,
one model decode step captured in a CUDA graph, and a generation loop around it.

* :class:`StaticHybridLayer`: a :class:`~.generation.HybridLayer` whose state lives in preallocated
  :class:`~lolcats_cli.kernels.static.StaticState` buffers; a one-token call runs
  :func:`~lolcats_cli.kernels.static.static_step`, in place, without host synchronisation. On
  CUDA it runs :func:`~lolcats_cli.kernels.triton_step.triton_step` instead (the same step fused into two Triton
  kernels per layer; ``LOLCATS_TRITON_STEP=0`` turns that off, ``=1`` asks for it on any device, which off CUDA
  means ``TRITON_INTERPRET=1``), unless the layer's window or shapes are ones it does not take
  (:func:`~lolcats_cli.kernels.triton_step.triton_step_problem`). :attr:`StaticHybridLayer.step_name` says which ran.
* :class:`StaticDecoder`: for a fixed batch, a cache of those layers plus static input buffers (token, position,
  a placeholder 4-D mask, which transformers passes through as it is); :meth:`~StaticDecoder.step` runs one
  model decode step, replaying a CUDA graph captured once (``graph=True``, CUDA only) or eagerly (any device:
  what the CPU tests run). :meth:`~StaticDecoder.load` copies an eager cache's states in after a prefill and
  :meth:`~StaticDecoder.store` writes them back, so a chat can keep its ordinary cache between turns.
* :func:`static_sample`: a decoding loop for ``model.generate(..., custom_generate=static_sample)`` (a
  transformers hook): the prompt through the model's cache as usual, then one decoder step per token;
  :func:`decoder_for` keeps one decoder (one captured graph) per model between calls.

:func:`static_decode_problem` says why a model cannot use this path (a softmax layer, a window without a ring,
batch or device); callers use plain ``model.generate``. ``LOLCATS_STATIC_DECODE=0`` turns the path off
where it would be used by default (``lolcats chat`` and :func:`install_static_generate` models on CUDA);
``LOLCATS_STATIC_DECODE=1`` turns it on on any device (eager steps off CUDA).

:func:`install_static_generate` makes a model's plain ``generate()`` take the static loop where it can (greedy
or sampling, a model the path runs, the device default above) and transformers' own loop otherwise; the models
lolcats loads (``open_run``, ``load_adapter_export``) have it. The ``hf`` export's model, which bundles this
module, routes each ``generate()`` call the same way in its class (:func:`static_generate_kwargs`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from ...errors import ModelError
from ...switches import OFF, ON, switch
from ...hf_compat import CACHE_ARGS, OUTPUT_CACHE_FIELDS, cache_kwarg, last_logits_kwargs
from ...kernels.recurrent import HybridState
from ...kernels.static import StaticState, fold_width, static_step, static_supported
from ...kernels.triton_import import triton_available
from ...kernels.triton_step import fused_query_map, triton_step, triton_step_enabled, triton_step_problem
from ..model.linear_attention import linearized_layers
from .cache import LinearAttentionCache
from .generation import HybridAttentionModule, HybridLayer

log = logging.getLogger(__name__)
ENV = "LOLCATS_STATIC_DECODE"  # "0" turns the static/CUDA-graph path off where it is the default
COMPILE_ENV = "LOLCATS_COMPILE_DECODE"  # a torch.compile backend for the decode step (1 = inductor); off by default
STATE_ENV = "LOLCATS_STATE_DTYPE"  # bf16 / fp16 keeps each layer's S in half precision (fp32 by default)
_STATE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def state_dtype() -> torch.dtype:
    """The dtype the static decoder keeps the linear state S in: ``LOLCATS_STATE_DTYPE`` (fp32, the default; bf16;
    fp16). ValueError naming anything else."""
    value = os.environ.get(STATE_ENV, "fp32").strip().lower()
    if value not in _STATE_DTYPES:
        raise ValueError(f"{STATE_ENV}={os.environ[STATE_ENV]!r} is not a state dtype: use fp32, bf16 or fp16")
    return _STATE_DTYPES[value]


@functools.lru_cache(maxsize=None)
def _collect_before_exit() -> None:
    """Once per process, after the first compiled decoder's CUDA graph: collect garbage and synchronize at exit,
    before the interpreter tears torch down. On one H200 a process whose compiled decoder had been replaced (a new
    batch size, another engine) aborted at exit (``std::bad_array_new_length``) or segfaulted after its work was
    done; a collection and a synchronize at the end of the script avoided it (this exit hook is the same two calls;
    not yet run on a GPU in this form)."""
    import atexit
    import gc

    def collect() -> None:
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    atexit.register(collect)


def compile_backend() -> str | None:
    """The ``torch.compile`` backend the static decoder compiles its step with: ``LOLCATS_COMPILE_DECODE`` (1 or
    inductor, or any backend name such as aot_eager), None when unset or 0 (the default: on one H200 compiling the
    8B shape's step took about 36 s, for 5.99 ms per step at batch 1 against 7.51)."""
    value = os.environ.get(COMPILE_ENV, "").strip()
    if not value or value.lower() in OFF:
        return None
    return "inductor" if value.lower() in ON else value


def static_decode_enabled(device: torch.device) -> bool:
    """Whether the static path is the default on ``device``: CUDA, unless ``LOLCATS_STATIC_DECODE=0``; any device
    with ``LOLCATS_STATIC_DECODE=1`` (off CUDA the steps run eagerly, without a graph). ValueError for a value that is
    not a switch."""
    value = switch(ENV, "on for CUDA devices")
    return value if value is not None else device.type == "cuda"


def static_decode_problem(model: Any) -> str | None:
    """None when every decoder layer of ``model`` is a converted layer in student mode whose window the static
    step supports; else why not (a sentence)."""
    layers = linearized_layers(model)
    n = int(model.config.get_text_config(decoder=True).num_hidden_layers)
    if len(layers) != n:
        return f"{n - len(layers)} of {n} layers keep softmax attention (a growing KV cache)"
    for i, m in layers:
        if m.mode != "student":
            return f"layer {i} is in {m.mode} mode"
        if m.delta_rule:
            return f"layer {i} keeps a delta-rule state (the static step implements the additive one)"
        if why := static_supported(m.window):
            return f"layer {i}: {why}"
        if not getattr(m.kernel, "exact", True):  # an approximation keeps a state the static step does not know
            return f"layer {i} runs the approximate kernel {m.kernel.name!r}"
    return None


def static_wanted(model: Any, static: bool | None) -> bool:
    """Whether to decode ``model`` through the static path: ``static`` when given, else on CUDA unless
    ``LOLCATS_STATIC_DECODE=0``; never for a model it cannot run (a debug log says why)."""
    params = getattr(model, "parameters", None)
    device = next(params()).device if callable(params) else None
    if not (static if static is not None else device is not None and static_decode_enabled(device)):
        return False
    why = static_decode_problem(model)
    if why:
        log.debug("static decoding is off: %s", why)
    return why is None


def plain_loop_needed(model: Any, kwargs: dict[str, Any]) -> str | None:
    """Why ``model.generate(**kwargs)`` needs transformers' own loop (beam search, assisted or contrastive
    decoding, attentions or hidden states to return, synced GPUs, a custom loop already named); None when
    :func:`static_sample` runs it (greedy or sampling)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str, default: Any = None) -> Any:
        return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, default)

    if "custom_generate" in kwargs:
        return "the call names its own custom_generate"
    if (setting("num_beams", 1) or 1) > 1:
        return "beam search"
    if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens"):
        return "assisted decoding"
    if setting("penalty_alpha"):
        return "contrastive search"
    if setting("output_attentions") or setting("output_hidden_states"):
        return "attentions or hidden states are returned"
    if kwargs.get("synced_gpus"):
        return "synced GPUs"
    return None


def static_generate_kwargs(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``model.generate(**kwargs)`` that decode through :func:`static_sample` when
    :func:`static_wanted` (on CUDA by default; see :data:`ENV`) and the call is greedy or sampling
    (:func:`plain_loop_needed`; a ``streamer`` is handed over as ``static_streamer``); ``kwargs`` unchanged
    otherwise. What :func:`install_static_generate` and the ``hf`` export's ``generate`` apply to each call."""
    if plain_loop_needed(model, kwargs) is not None or not static_wanted(model, None):
        return kwargs
    kwargs = {**kwargs, "custom_generate": static_sample}
    if kwargs.get("streamer") is not None:
        kwargs["static_streamer"] = kwargs.pop("streamer")
    return kwargs


def install_static_generate(model: Any) -> Any:
    """Make ``model.generate()`` decode through :func:`static_sample` where :func:`static_generate_kwargs` says
    so; every other call goes to the model's own ``generate`` unchanged. Returns ``model`` (its ``generate``
    replaced on the instance)."""
    plain = model.generate

    @functools.wraps(plain)
    def generate(*args: Any, **kwargs: Any) -> Any:
        return plain(*args, **static_generate_kwargs(model, kwargs))

    model.generate = generate
    return model


class StaticHybridLayer(HybridLayer):
    """A cache layer holding a :class:`StaticState`; :meth:`attend` takes one token per row, in place.

    ``length`` is kept on the host too (for transformers' bookkeeping and ``get_seq_length``); the device
    copy in the state is what the step reads. ``step_name``: the step the last call ran, ``"triton"``
    (:func:`~lolcats_cli.kernels.triton_step.triton_step`) or ``"torch"`` (``static_step``); None before the first.
    """

    def __init__(self, static: StaticState, fold: int, triton: bool | None = None) -> None:
        super().__init__()
        self.static, self.fold, self.length = static, fold, int(static.length.item())
        self.is_initialized = True
        self.triton = triton
        self.step_name: str | None = None

    def use_triton(self, window: Any, device: torch.device) -> bool:
        """Whether a call runs the Triton step. ``triton`` False: never; True: wherever it can run; None (the
        default): :func:`triton_step_enabled` on ``device`` (CUDA, unless ``LOLCATS_TRITON_STEP=0``). It can run
        when Triton is installed and :func:`triton_step_problem` finds nothing against the window and shapes."""
        wanted = triton_step_enabled(device) if self.triton is None else self.triton and triton_available()
        return wanted and triton_step_problem(window, self.static, device) is None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn: HybridAttentionModule, mask: Any = None) -> Tensor:
        if q.shape[2] != 1 or q.shape[0] != self.static.S.shape[0]:
            raise ModelError(
                f"layer {attn.layer_idx}: the static decode cache takes one token for each of its "
                f"{self.static.S.shape[0]} rows; got {q.shape[2]} tokens for {q.shape[0]} rows",
                hint="prefill with an ordinary cache, then StaticDecoder.load(cache)",
            )
        phi_q, phi_k, window_logits, window = attn.kernel_args()
        fused = self.use_triton(window, q.device)
        self.step_name = "triton" if fused else "torch"
        args = (q, k, v, phi_q, phi_k, window_logits, window, self.static, attn.scaling)
        if not fused:
            return static_step(*args, log_decay=attn.log_decay(), fold=self.fold)
        # phi_q is feature_map_q(q) * the linear gate (LinearizedAttention.phi_q): the kernel computes it for hedgehog
        q_map = fused_query_map(attn.feature_map_q, attn.linear_gate_values(), self.static.S.shape[2])
        return triton_step(*args, log_decay=attn.log_decay(), fold=self.fold, q_map=q_map)

    def get_seq_length(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return self.static.nbytes()


def empty_hybrid_state(m: Any, batch: int, device: torch.device, dtype: torch.dtype) -> HybridState:
    """The empty :class:`HybridState` of converted layer ``m`` for ``batch`` rows (K/V in ``dtype``, S, z fp32)."""
    with torch.no_grad():
        probe = torch.zeros(1, m.num_heads, 1, m.head_dim, device=device)
        features = int(m.feature_map_k(probe).shape[-1])
    return HybridState.empty(batch, m.num_heads, m.num_kv_heads, m.head_dim, m.head_dim, features, m.window.span,
                             device=device, dtype=dtype, sinks=m.window.sinks)  # fmt: skip


class StaticDecoder:
    """One decode step of ``model`` for ``batch`` rows over static buffers; with ``graph`` (CUDA only) captured
    once in a CUDA graph and replayed. Use: :meth:`load` an eager cache after the prefill, then :meth:`step`
    with each next token; :meth:`store` writes the states back into that cache. ``triton``: which decode step the
    layers run (see :meth:`StaticHybridLayer.use_triton`: None the default choice, False ``static_step``).
    ``compiler``: a ``torch.compile`` backend for the step (None: :func:`compile_backend`, off by default; "" off),
    compiled before the graph is captured, so the replay runs the fused kernels (norms, rotary, activations).
    ``s_dtype``: the dtype of each layer's S (None: :func:`state_dtype`, fp32 by default; bf16 halves the state,
    every step still computing in fp32)."""

    def __init__(self, model: Any, batch: int, graph: bool | None = None, warmup: int = 2,
                 triton: bool | None = None, compiler: str | None = None,
                 s_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        if why := static_decode_problem(model):
            raise ModelError(f"static decoding cannot run this model: {why}", hint="use model.generate()")
        param = next(model.parameters())
        # a weak reference: decoder_for() keeps decoders in a dict weakly keyed by their model
        self._model, self.batch, self.device = weakref.ref(model), batch, param.device
        self.graph_on = self.device.type == "cuda" if graph is None else graph
        # the step is chosen once: a captured graph replays the kernels it was captured with
        self.triton = triton_step_enabled(self.device) if triton is None else triton
        if self.graph_on and self.device.type != "cuda":
            raise ModelError(f"CUDA graphs need a CUDA device; the model is on {self.device}", hint="pass graph=False")
        kv_dtype = model.get_input_embeddings().weight.dtype
        empty = [(m, empty_hybrid_state(m, batch, self.device, kv_dtype)) for _, m in linearized_layers(model)]
        self.s_dtype = state_dtype() if s_dtype is None else s_dtype
        self.layers = [StaticHybridLayer(StaticState.from_hybrid(s, s_dtype=self.s_dtype), fold_width(m.window),
                                         self.triton) for m, s in empty]  # fmt: skip
        self.cache = LinearAttentionCache(list(self.layers))
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.mask = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=self.device)  # passed through, unread
        self.kwargs = {cache_kwarg(model): self.cache, "use_cache": True, **last_logits_kwargs(model)}
        self.logits: Tensor | None = None
        self._graph: Any = None
        self.compiled = compile_backend() if compiler is None else compiler or None
        self._run = self._forward if self.compiled is None else self._compiled(self.compiled)
        if self.graph_on:
            self._capture(warmup)
            if self.compiled:
                _collect_before_exit()

    def _compiled(self, backend: str) -> Callable[[], Tensor]:
        """The step through ``torch.compile``. The fused Triton step breaks the graph inside every layer's attention
        (a graph break in the loop over layers): dynamo then compiles each decoder layer's frames once per layer, so
        its recompile limit (8 by default) is raised for these calls to cover every layer; with the default, the
        layers past the eighth ran eagerly."""
        compiled = torch.compile(self._forward, backend=backend, dynamic=False)
        limit = max(torch._dynamo.config.recompile_limit, 4 * len(self.layers) + 8)

        def run() -> Tensor:
            with torch._dynamo.config.patch(recompile_limit=limit):
                return compiled()

        return run

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise ModelError("the model of this static decoder no longer exists")
        return model

    def _forward(self) -> Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask, **self.kwargs)
        self.positions.add_(1)
        return out.logits[:, -1]

    @torch.inference_mode()
    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream, then capture one step (on zeroed states: :meth:`load` sets the real ones)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 3 if self.compiled else 0)):  # compiling runs the step a few times
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._run()

    @torch.inference_mode()
    def load(self, cache: Any) -> None:
        """Copy the states of ``cache`` (a transformers cache of :class:`HybridLayer` s after a prefill of
        ``batch`` rows) into the static buffers."""
        layers = list(getattr(cache, "layers", []))
        filled = all(isinstance(x, HybridLayer) and x.state is not None for x in layers)
        if any(getattr(x.state, "recall", None) is not None for x in layers if isinstance(x, HybridLayer)):
            raise ModelError("static decoding cannot load a state with a recall cache (an approximate kernel)")
        if len(layers) != len(self.layers) or not filled:
            raise ModelError("static decoding loads a cache with a filled HybridLayer per layer (after a prefill)")
        for mine, theirs in zip(self.layers, layers):
            mine.static.load_(theirs.state, theirs.pads)
            mine.length = theirs.state.length
        static = self.layers[0].static
        self.positions.copy_((static.length - static.pads)[:, None])

    @torch.inference_mode()
    def store(self, cache: Any) -> None:
        """Write the decoded states back into ``cache``'s layers (the ones :meth:`load` read)."""
        for mine, theirs in zip(self.layers, cache.layers):
            theirs.state = mine.static.to_hybrid()

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed ``tokens`` ``(batch,)`` or ``(batch, 1)`` at the next position; the logits ``(batch, vocab)``
        (a buffer the next step overwrites)."""
        self.ids.copy_(tokens.view(self.batch, 1))
        if self._graph is not None:
            self._graph.replay()
        else:
            self.logits = self._run()
        for layer in self.layers:
            layer.length += 1
        assert self.logits is not None
        return self.logits

    @property
    def step_name(self) -> str | None:
        """The decode step the layers ran last: ``"triton"``, ``"torch"``, ``"mixed"``, or None before any step."""
        names = {layer.step_name for layer in self.layers}
        return names.pop() if len(names) == 1 else "mixed"

    def state_nbytes(self) -> int:
        """Bytes of all layers' states (constant in the length)."""
        return sum(layer.nbytes() for layer in self.layers)


_DECODERS: weakref.WeakKeyDictionary[Any, StaticDecoder] = weakref.WeakKeyDictionary()


def decoder_for(model: Any, batch: int) -> StaticDecoder:
    """The :class:`StaticDecoder` of ``model`` for ``batch`` rows, built (its CUDA graph captured) on first use and
    kept for the next calls; one per model (a new batch size, or a change of ``LOLCATS_TRITON_STEP``,
    ``LOLCATS_COMPILE_DECODE`` or ``LOLCATS_STATE_DTYPE``, replaces the old decoder)."""
    decoder = _DECODERS.get(model)
    if (decoder is None or decoder.batch != batch or decoder.triton != triton_step_enabled(decoder.device)
            or decoder.compiled != compile_backend() or decoder.s_dtype != state_dtype()):  # fmt: skip
        _DECODERS.pop(model, None)  # free the old graph's buffers before capturing a new one
        decoder = _DECODERS[model] = StaticDecoder(model, batch)
    return decoder


_PLAIN = "call generate() without custom_generate"


@torch.no_grad()
def static_sample(
    model: Any, input_ids: Tensor, logits_processor: Any, stopping_criteria: Any, generation_config: Any,
    synced_gpus: bool = False, streamer: Any = None, static_streamer: Any = None, **model_kwargs: Any,
) -> Any:  # fmt: skip
    """A decoding loop for ``model.generate(..., custom_generate=static_sample)``: greedy or sampling as
    ``generate`` configures it (its logits processors, stopping criteria, streamer and pad token), the prompt
    read through the model's cache as usual (only its new tokens when the cache already holds some), then
    one :class:`StaticDecoder` step per token (a CUDA-graph replay on CUDA). The decoded states are written back
    into the cache, so it can be passed to the next call. Returns what ``generate`` would: the sequences, or a
    ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate`` (scores and logits when asked for).
    ModelError for a model the static path cannot run (:func:`static_decode_problem`).

    A streamer goes in as ``static_streamer=``: ``generate`` hands a callable ``custom_generate`` only the
    keyword arguments ``_sample`` does not take, and drops ``streamer`` (it would wait for an ``end()`` forever).
    """
    from transformers import DynamicCache
    from transformers.generation import GenerateDecoderOnlyOutput

    if why := static_decode_problem(model):
        raise ModelError(f"static decoding cannot run this model: {why}", hint=_PLAIN)
    if synced_gpus:
        raise ModelError("static decoding does not run with synced_gpus", hint=_PLAIN)
    if static_streamer is not None:  # generate() did not see it: the prompt goes in here
        streamer = static_streamer
        streamer.put(input_ids.cpu())
    cache = next((model_kwargs[n] for n in CACHE_ARGS if model_kwargs.get(n) is not None), None)
    cache = DynamicCache() if cache is None else cache
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    seen = cache.get_seq_length()
    positions = (mask.long().cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)  # a padded row starts at 0
    kwargs = {cache_kwarg(model): cache, "use_cache": True, **last_logits_kwargs(model)}
    logits = model(input_ids=input_ids[:, seen:], attention_mask=mask, position_ids=positions[:, seen:], **kwargs)
    logits = logits.logits[:, -1]
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    keep_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    keep_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores: tuple[Tensor, ...] = ()
    raw: tuple[Tensor, ...] = ()
    decoder: StaticDecoder | None = None
    while True:
        logits = logits.float()
        next_scores = logits_processor(input_ids, logits)
        scores += (next_scores,) if keep_scores else ()
        raw += (logits.clone(),) if keep_logits else ()
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1)[:, 0]
        else:
            tokens = next_scores.argmax(dim=-1)
        if has_eos:  # finished rows get the pad token
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, int(pad)))
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
        if not bool(unfinished.any()):
            break
        if decoder is None:
            decoder = decoder_for(model, input_ids.shape[0])
            decoder.load(cache)
        logits = decoder.step(tokens)
    if decoder is not None:
        decoder.store(cache)
    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    fields = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    name = next(n for n in OUTPUT_CACHE_FIELDS if n in fields)
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores or None, logits=raw or None, **{name: cache})


__all__ = [
    "COMPILE_ENV", "ENV", "STATE_ENV", "StaticDecoder", "StaticHybridLayer", "compile_backend", "decoder_for",
    "empty_hybrid_state", "install_static_generate", "plain_loop_needed", "state_dtype", "static_decode_enabled",
    "static_decode_problem", "static_generate_kwargs", "static_sample", "static_wanted",
]
