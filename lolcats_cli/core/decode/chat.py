"""Chatting with a converted model: a :class:`ChatSession` (history, chat template, streamed replies, memory
stats) and :func:`load_chat_model`; the loop, :func:`~.repl.run_repl`, lives in :mod:`.repl` (re-exported here).

    recipe, model, tokenizer = open_run("runs/smollm2-135m")
    session = ChatSession(model, tokenizer, system="Be brief.")
    for piece in session.reply("What is a cat?"):
        print(piece, end="", flush=True)
    print(session.stats_text())          # tokens/s, first token, tokens and MiB in the state
    run_repl(input, sys.stdout.write, session)

No typer or rich here: the CLI renders.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ...errors import LolcatsError, ModelError
from ..runs.rundir import RESOLVED_RECIPE, finished_run, is_run_dir
from .chat_stats import ReplyStats, describe_cache, softmax_kv_bytes, state_bytes  # re-exported
from .repl import HELP, Conversation, read_message, run_repl  # the loop, re-exported: chat's public names

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- session


class ChatSession:
    """A conversation with ``model``: the history, the chat template, and streamed generation.

    Each reply renders the whole conversation (system prompt, every turn, the new message) with the
    tokenizer's chat template (a plain ``User:``/``Assistant:`` transcript when it has none) and generates
    with ``model.generate`` in a thread, yielding text as it is decoded. ``temperature`` 0 is greedy.
    A reply enters the history only once it is complete (an interrupted one leaves no trace).

    With ``keep_state`` (the default) the generation cache (a constant-size state per converted layer)
    survives between turns: when the new conversation's tokens start with exactly the tokens the state has
    consumed, only the rest is read, which gives the same tokens and logits as reading it all again. When the
    template renders earlier turns differently (or a reply was interrupted, or the system prompt changed) the
    whole conversation is read again from a fresh cache, and a debug log says why.

    ``static`` (default: on CUDA, unless ``LOLCATS_STATIC_DECODE=0``) passes ``generate`` the decoding loop
    :func:`.static_decode.static_sample`: one CUDA-graph replay per token over preallocated state buffers (eager
    static steps off CUDA). A model it cannot run (a softmax layer, a window without a ring) decodes as usual.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        keep_state: bool = True,
        static: bool | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise LolcatsError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}",
                               "use e.g. 256")  # fmt: skip
        if temperature < 0:
            raise LolcatsError(f"temperature (--temperature) must be >= 0, got {temperature}",
                               "use 0 for greedy decoding, 0.7 to sample")  # fmt: skip
        if not 0 < top_p <= 1:
            raise LolcatsError(f"top_p (--top-p) must be in (0, 1], got {top_p}",
                               "use 0.9, or 1 to turn nucleus sampling off")  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.system = system or None
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.history: list[dict[str, str]] = []  # user / assistant turns, oldest first
        self.last_stats: ReplyStats | None = None
        self.last_original_stats: ReplyStats | None = None
        self._last_prompt: str | None = None
        self.keep_state = keep_state
        self._cache: Any = None  # the generation cache kept between turns (None: start afresh)
        self._consumed: list[int] = []  # the tokens that cache has read, in order
        from .static_decode import static_wanted

        self.static = static_wanted(model, static)
        self._decoder: Any = None  # the static decoder (its CUDA graph) reused across turns

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def messages(self, text: str | None = None) -> list[dict[str, str]]:
        """System prompt + history (+ a new user message ``text``), as chat-template messages."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.history
        return out + ([{"role": "user", "content": text}] if text is not None else [])

    def prompt(self, text: str) -> str:
        """The exact prompt string for a new user message ``text``, ending where the assistant speaks."""
        messages = self.messages(text)
        if self.has_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        return "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.history.clear()
        self.last_stats = self.last_original_stats = self._last_prompt = None
        self.drop_state()

    def drop_state(self) -> None:
        """Forget the kept generation state: the next reply reads the whole conversation."""
        self._cache, self._consumed = None, []

    @property
    def state_tokens(self) -> int:
        """How many tokens the kept state has consumed (0 when none is kept)."""
        return len(self._consumed)

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (None or "" removes it); the history stays."""
        self.system = text or None

    def reply(self, text: str) -> Iterator[str]:
        """Stream the model's answer to ``text``; the turn is recorded when the stream ends."""
        self._last_prompt = prompt = self.prompt(text)
        pieces: list[str] = []
        for piece in self._generate(prompt, original=False):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def original_reply(self) -> Iterator[str]:
        """Stream the original model's answer (softmax attention, LoRA off) to the prompt the last
        :meth:`reply` got, for a side-by-side comparison; not recorded. Needs a converted model."""
        if self._last_prompt is None:
            raise LolcatsError("nothing to compare yet: original_reply() answers the last reply's prompt",
                               "call reply(text) first")  # fmt: skip
        yield from self._generate(self._last_prompt, original=True)

    def stats_text(self) -> str:
        """``/stats``: the last reply's speed and memory (and the original model's, after a comparison)."""
        if self.last_stats is None:
            return "no reply yet: send a message first"
        lines = [self.last_stats.summary("last reply")]
        if self.last_original_stats is not None:
            lines.append(self.last_original_stats.summary("original model"))
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------- internals

    def _generate(self, prompt: str, original: bool) -> Iterator[str]:
        """Run ``model.generate`` in a thread and yield decoded text; stats land in ``last_*stats``."""
        from ...hf_compat import cache_kwarg, output_cache

        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        streamer = _timed_streamer(self.tokenizer)
        stop = threading.Event()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=mask, streamer=streamer, max_new_tokens=self.max_new_tokens,
            stopping_criteria=_stop_when(stop), return_dict_in_generate=True, pad_token_id=pad,
        )  # fmt: skip
        kept = 0
        if not original:
            cache, kept = self._state_for(input_ids[0].tolist())
            self.drop_state()  # generate() changes the cache: it is kept again only if the reply completes
            if cache is not None:
                kwargs[cache_kwarg(self.model)] = cache
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        result: dict[str, Any] = {}
        if self.static and not original and self._static_decoder() is not None:
            from .static_decode import static_sample

            kwargs["custom_generate"] = static_sample
            kwargs["static_streamer"] = kwargs.pop("streamer")  # generate() drops `streamer` for a custom loop
        else:
            kwargs["custom_generate"] = None  # transformers' own loop, also where open_run installed the static one

        def work() -> None:
            import torch

            try:
                with torch.inference_mode(), _original_model(self.model, kwargs) if original else nullcontext():
                    result["out"] = self.model.generate(**kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="lolcats-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:  # on Ctrl-C or an abandoned stream too: generation stops after the current step
            stop.set()
            while thread.is_alive():  # never leave a generate() running on the model (a 2nd Ctrl-C waits too)
                try:
                    thread.join()
                except KeyboardInterrupt:
                    continue
        if "error" in result:
            raise result["error"]
        out, prompt_len = result["out"], input_ids.shape[1]
        total = int(out.sequences.shape[1])
        cache = output_cache(out)
        consumed = _consumed_tokens(cache, out.sequences[0])
        if self.keep_state and not original and consumed is not None:
            self._cache, self._consumed = cache, consumed
        stats = ReplyStats(
            prompt_tokens=prompt_len,
            new_tokens=total - prompt_len,
            seconds=time.perf_counter() - start,
            first_token_seconds=None if streamer.first_token_at is None else streamer.first_token_at - start,
            state_bytes=state_bytes(output_cache(out)),
            softmax_kv_bytes=softmax_kv_bytes(self.model.config, total, _dtype_bytes(self.model)),
            cache=describe_cache(output_cache(out)),
            read_tokens=prompt_len - kept,
            state_tokens=len(consumed) if consumed is not None else 0,
        )
        if original:
            self.last_original_stats = stats
        else:
            self.last_stats, self.last_original_stats = stats, None


    def _static_decoder(self) -> Any:
        """The static decoder for one row (built once; its CUDA graph captured then), or None when it cannot be
        built here (the session then uses ``generate``; a warning says why)."""
        if self._decoder is None:
            from .static_decode import decoder_for

            try:
                self._decoder = decoder_for(self.model, 1)
            except Exception as e:  # an unfamiliar GPU or model: the eager path still works
                why = f"{type(e).__name__}: {e}"
                log.warning("static decoding is off for this chat (%s); using model.generate()", why)
                self.static = False
        return self._decoder

    def _state_for(self, ids: list[int]) -> tuple[Any, int]:
        """``(cache, tokens it holds)`` to generate a reply to the conversation ``ids``: the kept cache when its
        tokens are exactly a prefix of ``ids`` (generate() then reads only the rest), else a fresh one."""
        from ...hf_compat import DynamicCache

        if not self.keep_state:
            return None, 0
        seen = self._consumed
        if self._cache is not None and seen:
            if len(seen) < len(ids) and ids[: len(seen)] == seen:
                new = len(ids) - len(seen)
                log.debug("chat: %d tokens are in the kept state; reading the %d new ones", len(seen), new)
                return self._cache, len(seen)
            at = next((i for i, (a, b) in enumerate(zip(seen, ids)) if a != b), min(len(seen), len(ids)))
            log.debug(
                "chat: the conversation's tokens do not extend the kept state's %d (they differ from token %d of "
                "%d: the template rendered earlier turns differently, or the system prompt changed); reading the "
                "whole conversation again", len(seen), at, len(ids),
            )  # fmt: skip
        return DynamicCache(), 0


def _consumed_tokens(cache: Any, sequence: Any) -> list[int] | None:
    """The tokens ``cache`` has read: the first ``cache.get_seq_length()`` of ``sequence`` (prompt + reply;
    the last token generated is never fed back), or None for a cache that cannot say."""
    length = getattr(cache, "get_seq_length", None)
    if cache is None or length is None:
        return None
    n = int(length())
    return sequence[:n].tolist() if 0 < n <= int(sequence.shape[0]) else None


def _timed_streamer(tokenizer: Any) -> Any:
    """A ``TextIteratorStreamer`` (reply text only) that also notes when the first new token arrived."""
    from transformers import TextIteratorStreamer

    class _Timed(TextIteratorStreamer):
        first_token_at: float | None = None

        def put(self, value: Any) -> None:
            if self.first_token_at is None and not self.next_tokens_are_prompt:
                self.first_token_at = time.perf_counter()
            super().put(value)

    return _Timed(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _dtype_bytes(model: Any) -> int:
    """Bytes per element of the model's activations (its floating-point parameter dtype)."""
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    return dtype.itemsize


def _stop_when(event: threading.Event) -> Any:
    """A StoppingCriteriaList that ends generation once ``event`` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def require_original(model: Any) -> list[tuple[int, Any]]:
    """The converted layers of ``model`` (to switch to softmax for a comparison); ModelError when none."""
    from ..model.linear_attention import linearized_layers

    layers = linearized_layers(model) or [  # an hf export runs a bundled copy of LinearizedAttention
        (m.layer_idx, m) for m in model.modules() if type(m).__name__ == "LinearizedAttention" and hasattr(m, "mode")
    ]
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no lolcats layers to switch back to the original softmax attention",
            "compare with the run directory the export came from: lolcats chat RUN_DIR --compare",
        )
    return layers


def original_caveat(model: Any) -> str | None:
    """Why the "original" reply of ``model`` is not exactly the base model's, or None when it is."""
    info = getattr(model.config, "lolcats", None)  # what an hf export records
    if isinstance(info, dict) and info.get("lora_merged"):
        return ("this export has its LoRA merged into the weights: the original reply uses softmax attention on "
                "those weights, not the base model's; compare with the finetune run directory for the exact original")
    return None


@contextmanager
def _original_model(model: Any, generate_kwargs: dict[str, Any]) -> Iterator[None]:
    """Softmax attention (``teacher`` mode) with any LoRA adapter disabled, restored afterwards; the
    original attention needs every past key, so generation gets a plain DynamicCache."""
    from ...hf_compat import DynamicCache, cache_kwarg
    from ..model.convert import teacher_view

    layers = require_original(model)  # ours, or an hf export's bundled copies
    generate_kwargs[cache_kwarg(model)] = DynamicCache()
    with teacher_view(model, layers):
        yield


# ---------------------------------------------------------------------------------------------- loading


def load_chat_model(path: str | Path, device: Any = None, keep_adapter: bool = False) -> tuple[Any, Any, str]:
    """``(model, tokenizer, description)`` from a run directory (``recipe.resolved.yaml``) or a folder from
    ``lolcats export --format hf`` (``config.json``). ``keep_adapter`` leaves a finetune run's LoRA unmerged,
    so :meth:`ChatSession.original_reply` can switch it off."""
    from ..runs.workspace import open_run, pick_device

    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise LolcatsError(f"{folder} {what}; expected a run directory or an exported model folder", _WHERE_HINT)
    if is_run_dir(folder):
        recipe, model, tokenizer = open_run(folder, pick_device(device), merge_lora=not keep_adapter)
        return model, tokenizer, f"{finished_run(folder)} run of {recipe.model.name}"
    if (folder / "config.json").exists():
        return (*_load_export(folder, pick_device(device)), "exported model")
    found = sorted(p.name for p in folder.iterdir())[:6]
    raise LolcatsError(
        f"{folder} is neither a lolcats run directory (no {RESOLVED_RECIPE}) nor an exported model "
        f"folder (no config.json); it holds: {', '.join(found) or 'nothing'}",
        _WHERE_HINT,
    )


def use_recall_cache(model: Any, slots: int) -> int:
    """From now on every converted layer of ``model`` runs the recall kernel (:mod:`lolcats_cli.kernels.recall`)
    with ``slots`` exact keys per KV head beside its window and sinks: the keys its linear state recalls worst,
    so a detail far back can be read exactly; the state stays constant-size (``slots`` keys and values per KV
    head more). Decoding then takes ``model.generate``'s own loop (the static path runs the plain step only).
    Returns the number of layers. ModelError for a model without lolcats layers (an ``hf`` export bundles its own
    attention: chat with the run directory) or with delta-rule layers (the recall kernel keeps the additive state)."""
    from ..model.linear_attention import install_recall_kernel

    return len(install_recall_kernel(model, slots, "chat without --recall",
                                     no_layers_hint="chat with the run directory the export came from"))


_WHERE_HINT = (
    "pass the --output folder of `lolcats transfer` or `lolcats finetune`, or a folder written by "
    "`lolcats export --format hf`"
)


def _load_export(folder: Path, device: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"cannot load the exported model in {folder}: {first}",
                         "re-export it with `lolcats export RUN_DIR --format hf`") from e  # fmt: skip
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


__all__ = [
    "ChatSession", "Conversation", "ReplyStats", "HELP", "describe_cache", "load_chat_model", "original_caveat",
    "read_message", "require_original", "run_repl", "softmax_kv_bytes", "state_bytes", "use_recall_cache",
]
