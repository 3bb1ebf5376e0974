"""`lolcats chat`: the REPL loop driven by scripted callbacks (no model), a real ChatSession on a tiny
converted run, `-p` through the real CLI, and (slow) an interactive session with SmolLM2 in a pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lolcats_cli.core.decode.chat import HELP, ChatSession, read_message, run_repl, softmax_kv_bytes
from lolcats_cli.errors import LolcatsError

# ------------------------------------------------------------------------------- the loop, without a model


class FakeSession:
    """A Conversation that echoes, and records what the loop asked of it."""

    def __init__(self, interrupt_on: str | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.history: list[str] = []
        self.system: str | None = None
        self.interrupt_on = interrupt_on

    def reply(self, text: str) -> Iterator[str]:
        self.calls.append(("reply", text))
        yield "echo: "
        if text == self.interrupt_on:
            raise KeyboardInterrupt
        yield text
        self.history.append(text)

    def reset(self) -> None:
        self.calls.append(("reset", None))
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.calls.append(("system", text))
        self.system = text

    def stats_text(self) -> str:
        return "STATS: 3 turns"


def drive(lines: list[object], session: FakeSession | None = None) -> tuple[str, list[str], FakeSession, list[object]]:
    """Run the loop on scripted ``lines`` (an exception instance is raised instead of read); returns the
    output, the prompts shown, the session and the lines left unread."""
    session = session or FakeSession()
    todo, out, prompts = list(lines), [], []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        if not todo:
            raise EOFError
        item = todo.pop(0)
        if isinstance(item, BaseException):
            raise item
        return str(item)

    run_repl(read_line, out.append, session)
    return "".join(out), prompts, session, todo


def test_messages_stream_through_write_and_blank_lines_are_skipped():
    out, prompts, session, _ = drive(["hello", "", "   ", "second"])
    assert "echo: hello\n" in out and "echo: second\n" in out
    assert [c for c in session.calls if c[0] == "reply"] == [("reply", "hello"), ("reply", "second")]
    assert prompts == ["> "] * 5  # four lines, then EOF


def test_help_lists_every_command():
    out, *_ = drive(["/help"])
    assert HELP in out
    for command in ("/help", "/reset", "/system", "/stats", "/quit"):
        assert command in HELP


def test_reset_clears_the_history():
    out, _, session, _ = drive(["one", "two", "/reset", "three"])
    assert "conversation cleared" in out
    assert ("reset", None) in session.calls
    assert session.history == ["three"]


def test_system_sets_and_removes_the_system_prompt():
    out, _, session, _ = drive(["/system You are a pirate.  "])
    assert session.system == "You are a pirate."
    assert "system prompt set: You are a pirate." in out
    out, _, session, _ = drive(["/system"], FakeSession())
    assert session.calls == [("system", None)] and "system prompt removed" in out


def test_stats_prints_the_session_stats():
    out, *_ = drive(["/stats"])
    assert "STATS: 3 turns\n" in out


@pytest.mark.parametrize("command", ["/quit", "/exit", "  /quit  "])
def test_quit_stops_reading(command):
    _, _, session, left = drive(["hi", command, "never read"])
    assert left == ["never read"]
    assert session.calls == [("reply", "hi")]


@pytest.mark.parametrize("ending", [EOFError(), KeyboardInterrupt()])
def test_eof_and_ctrl_c_at_the_prompt_exit_cleanly(ending):
    out, _, _, left = drive(["hi", ending, "never read"])
    assert left == ["never read"]
    assert out.endswith("\n")


def test_ctrl_c_during_a_reply_stops_only_that_reply():
    out, _, session, _ = drive(["stop me", "next"], FakeSession(interrupt_on="stop me"))
    assert "[reply stopped]" in out
    assert session.history == ["next"]


def test_unknown_command_gets_a_one_line_hint():
    out, _, session, _ = drive(["/rest", "/frobnicate now"])
    lines = out.splitlines()
    assert "unknown command /rest; did you mean '/reset'? type /help for the list" in lines
    assert "unknown command /frobnicate; type /help for the list" in lines
    assert not [c for c in session.calls if c[0] == "reply"]


def test_double_slash_sends_a_message_starting_with_a_slash():
    _, _, session, _ = drive(["//etc/hosts is a file"])
    assert session.calls == [("reply", "/etc/hosts is a file")]


def test_backslash_continues_a_line():
    _, prompts, session, _ = drive(["first \\", "second\\", "third", "/quit"])
    assert session.calls == [("reply", "first \nsecond\nthird")]
    assert prompts == ["> ", "... ", "... ", "> "]


def test_triple_quote_blocks():
    lines = ['"""', "line one", "", "  indented", '"""', '"""one liner"""', '"""start', 'end"""']
    _, prompts, session, _ = drive(lines)
    assert session.calls == [
        ("reply", "line one\n\n  indented"),
        ("reply", "one liner"),
        ("reply", "start\nend"),
    ]
    assert prompts[:5] == ["> ", "... ", "... ", "... ", "... "]


def test_end_of_input_inside_a_block_sends_what_was_read():
    _, _, session, _ = drive(['"""', "unfinished"])
    assert session.calls == [("reply", "unfinished")]


def test_read_message_passes_eof_through_when_nothing_was_typed():
    def read_line(prompt: str) -> str:
        raise EOFError

    with pytest.raises(EOFError):
        read_message(read_line)


def test_on_message_replaces_the_default_rendering():
    seen: list[str] = []
    run_repl(_lines(["a", "b"]), lambda s: None, FakeSession(), on_message=seen.append)
    assert seen == ["a", "b"]


def _lines(lines: list[str]):
    todo = list(lines)

    def read_line(prompt: str) -> str:
        if not todo:
            raise EOFError
        return todo.pop(0)

    return read_line


# ------------------------------------------------------------------------ a real session on a tiny run


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished (one-step) transfer run of the tiny Llama."""
    from lolcats_cli.core.train.transfer import run_transfer
    from tiny_recipes import tiny_recipe  # tests/ is on sys.path (rootdir conftest)

    one_step = ["data.seq_len=64", "data.holdout=1", "data.num_eval_sequences=1", "data.max_samples=8",
                "transfer.grad_accum=1", "transfer.max_steps=1", "transfer.eval_every=1"]
    run = tmp_path_factory.mktemp("chat") / "run"
    run_transfer(tiny_recipe(tiny_model_dir, *one_step), run, device="cpu")
    return run


@pytest.fixture(scope="module")
def tiny_chat(tiny_run):
    from lolcats_cli.core.decode.chat import load_chat_model

    model, tokenizer, description = load_chat_model(tiny_run, "cpu")
    assert description.startswith("transfer run of ")
    return model, tokenizer


def test_session_applies_the_chat_template_and_grows_the_history(tiny_chat):
    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=4, temperature=0)
    assert session.has_template
    prompt = session.prompt("hello")
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")

    first = "".join(session.reply("hello"))
    assert session.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.strip()}]
    "".join(session.reply("and then?"))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert f"hello<|im_end|>\n<|im_start|>assistant\n{first.strip()}<|im_end|>" in session.prompt("x")

    session.set_system(None)
    assert "<|im_start|>system" not in session.prompt("x")
    session.reset()
    assert session.history == [] and session.last_stats is None
    assert session.stats_text() == "no reply yet: send a message first"


def test_stats_are_positive_and_the_state_does_not_grow_with_the_prompt(tiny_chat):
    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, max_new_tokens=4, temperature=0)
    "".join(session.reply("hi"))
    short = session.last_stats
    assert short is not None and 1 <= short.new_tokens <= 4
    assert short.seconds > 0 and short.tokens_per_s > 0 and short.state_bytes > 0
    assert short.cache == "constant-size state in 2/2 layers"
    config = model.config  # 2 layers, 2 KV heads of 16 dims, float32
    assert short.softmax_kv_bytes == softmax_kv_bytes(config, short.tokens, 4) == 2 * 2 * 2 * 16 * short.tokens * 4
    assert "state memory" in session.stats_text() and "tok/s" in session.stats_text()

    session.reset()
    "".join(session.reply("a much longer message " * 40))
    long = session.last_stats
    assert long.prompt_tokens > 5 * short.prompt_tokens
    assert long.state_bytes == short.state_bytes  # constant memory per sequence
    assert long.softmax_kv_bytes > short.softmax_kv_bytes


def test_original_reply_uses_softmax_with_a_kv_cache_matching_the_formula(tiny_chat):
    from lolcats_cli.core.model.convert import linearized_layers

    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, max_new_tokens=4, temperature=0)
    "".join(session.reply("hi"))
    "".join(session.original_reply())
    original = session.last_original_stats
    assert original.prompt_tokens == session.last_stats.prompt_tokens  # the same prompt, not the grown history
    assert original.cache.startswith("softmax KV cache")
    # the cache holds every token but the last one generated (never fed back)
    assert original.state_bytes == softmax_kv_bytes(model.config, original.tokens - 1, 4)
    assert [m.mode for _, m in linearized_layers(model)] == ["student", "student"]
    assert "original model:" in session.stats_text()


def test_an_abandoned_reply_leaves_no_trace(tiny_chat):
    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, max_new_tokens=4, temperature=0)
    stream = session.reply("hi")
    next(stream, None)
    stream.close()  # what Ctrl-C does: the generation thread stops, the turn is not recorded
    assert session.history == []


# ------------------------------------------------------------------ the state kept between turns

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def letter_chat(tmp_path_factory):
    """A converted tiny Llama (window 8 + 2 sinks, decay) and a byte-level tokenizer without merges whose greedy
    replies are letters only: every row of lm_head is 0 but those of a..z, which come in pairs (w, -w), so
    some letter always scores above 0. A reply's text then tokenizes back to exactly the generated tokens,
    and the chat template's next rendering extends what the state has read."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model, build_tiny_tokenizer
    from lolcats_cli.core.model.convert import convert_model

    folder = tmp_path_factory.mktemp("letters")
    tokenizer = build_tiny_tokenizer(folder, vocab_size=200)  # the byte alphabet + 3 specials: no merges
    build_tiny_model(folder, tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    convert_model(model, window="sliding", window_params={"size": 8, "sinks": 2}, decay=True)
    ids = tokenizer.convert_tokens_to_ids(list(LETTERS))
    with torch.no_grad():
        w = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        head = torch.zeros_like(model.lm_head.weight)
        head[ids[:13]], head[ids[13:]] = w, -w
        model.lm_head.weight.copy_(head)
    return model, tokenizer


def _greedy(model, tokenizer, **kwargs) -> ChatSession:
    return ChatSession(model, tokenizer, max_new_tokens=6, temperature=0, **kwargs)


def test_the_state_is_kept_between_turns_and_only_the_new_turn_is_read(letter_chat):
    model, tokenizer = letter_chat
    kept = _greedy(model, tokenizer, system="Be brief.")
    reread = _greedy(model, tokenizer, system="Be brief.", keep_state=False)
    first = "".join(kept.reply("hello"))
    assert first == "".join(reread.reply("hello")) and len(first) == 6 and set(first) <= set(LETTERS)
    one = kept.last_stats
    assert one.read_tokens == one.prompt_tokens and one.state_tokens == one.tokens - 1  # the last token is not fed
    assert kept.state_tokens == one.state_tokens

    second = "".join(kept.reply("and then?"))
    assert second == "".join(reread.reply("and then?"))  # same greedy tokens as reading it all again
    two, again = kept.last_stats, reread.last_stats
    conversation = len(tokenizer(kept._last_prompt, add_special_tokens=False)["input_ids"])
    assert two.prompt_tokens == again.prompt_tokens == conversation
    assert two.read_tokens == conversation - one.state_tokens  # only the tokens after the state's
    assert again.read_tokens == again.prompt_tokens
    assert two.state_tokens == one.state_tokens + two.read_tokens + two.new_tokens - 1
    assert two.state_bytes == one.state_bytes  # constant size
    stats = kept.stats_text()
    assert f"prompt {conversation} tokens ({two.read_tokens} read now, {one.state_tokens} kept in the state)" in stats
    assert f"the state holds {two.state_tokens} tokens in {two.state_bytes} bytes (constant in length)" in stats
    assert "first token after " in stats and "tok/s" in stats


def test_the_kept_state_gives_the_logits_of_a_whole_reread(letter_chat):
    import torch

    from lolcats_cli.hf_compat import cache_kwarg

    model, tokenizer = letter_chat
    session = _greedy(model, tokenizer)
    "".join(session.reply("hello"))
    cache, seen = session._cache, list(session._consumed)
    ids = tokenizer(session.prompt("next one"), add_special_tokens=False)["input_ids"]
    assert ids[: len(seen)] == seen and len(ids) > len(seen)
    with torch.inference_mode():
        suffix = torch.tensor([ids[len(seen):]])
        position_ids = torch.arange(len(seen), len(ids))[None]
        kept = model(suffix, position_ids=position_ids, use_cache=True, **{cache_kwarg(model): cache}).logits
        whole = model(torch.tensor([ids]), use_cache=False).logits[:, len(seen):]
    torch.testing.assert_close(kept, whole, atol=1e-4, rtol=1e-4)


def test_a_rerendered_history_falls_back_to_a_whole_reread(letter_chat, caplog):
    model, tokenizer = letter_chat
    session = _greedy(model, tokenizer)
    "".join(session.reply("hello"))
    session.set_system("Now a pirate.")  # the template renders the start of the conversation differently
    with caplog.at_level("DEBUG", logger="lolcats_cli.core.decode.chat"):
        reply = "".join(session.reply("ahoy"))
    assert "reading the whole conversation again" in caplog.text
    stats = session.last_stats
    assert stats.read_tokens == stats.prompt_tokens and "all read now" in session.stats_text()
    assert stats.state_tokens == stats.tokens - 1
    fresh = _greedy(model, tokenizer, system="Now a pirate.", keep_state=False)
    fresh.history = list(session.history[:2])
    assert "".join(fresh.reply("ahoy")) == reply


def test_an_interrupted_reply_or_a_reset_drops_the_state(letter_chat):
    model, tokenizer = letter_chat
    session = _greedy(model, tokenizer)
    "".join(session.reply("hello"))
    assert session.state_tokens > 0
    stream = session.reply("stop")
    next(stream, None)
    stream.close()
    assert session.state_tokens == 0 and len(session.history) == 2
    "".join(session.reply("again"))
    assert session.last_stats.read_tokens == session.last_stats.prompt_tokens
    session.reset()
    assert session.state_tokens == 0


def test_static_decoding_chats_like_generate(letter_chat):
    """The static path (eager steps on CPU; a CUDA graph on CUDA) keeps the state and replies token for token
    as model.generate does, greedy and sampled with the same seed."""
    import torch

    model, tokenizer = letter_chat
    static, eager = _greedy(model, tokenizer, static=True), _greedy(model, tokenizer, static=False)
    assert static.static and not eager.static
    for text in ("hello", "and then?", "last one"):
        assert "".join(static.reply(text)) == "".join(eager.reply(text))
        assert static.last_stats.read_tokens == eager.last_stats.read_tokens
        assert static.last_stats.state_tokens == eager.last_stats.state_tokens
    assert static._decoder is not None and static.last_stats.read_tokens < static.last_stats.prompt_tokens
    sampled = ChatSession(model, tokenizer, max_new_tokens=8, temperature=1.0, top_p=0.9, static=True)
    torch.manual_seed(0)
    first = "".join(sampled.reply("hi"))
    assert len(first) == 8 and set(first) <= set(LETTERS)


def test_a_recall_cache_rides_along_in_the_kept_state(letter_chat):
    """``use_recall_cache``: with 0 slots the replies are the plain model's; with 4, the kept state (recall slots
    included) gives the replies of reading the whole conversation again, in constant memory, a few bytes more than
    without the cache, through generate()'s own loop."""
    import copy

    from lolcats_cli.core.decode.chat import use_recall_cache

    model, tokenizer = letter_chat
    plain = _greedy(model, tokenizer)
    want = ["".join(plain.reply(t)) for t in ("hello", "and then?")]
    zero = copy.deepcopy(model)
    assert use_recall_cache(zero, 0) == model.config.num_hidden_layers
    assert ["".join(_greedy(zero, tokenizer).reply(t)) for t in ("hello", "and then?")] == want

    cached = copy.deepcopy(model)
    use_recall_cache(cached, 4)
    kept, reread = _greedy(cached, tokenizer), _greedy(cached, tokenizer, keep_state=False)
    assert not kept.static
    sizes = []
    for text in ("hello", "and then?"):
        assert "".join(kept.reply(text)) == "".join(reread.reply(text))
        sizes.append(kept.last_stats.state_bytes)
    assert kept.last_stats.read_tokens < kept.last_stats.prompt_tokens  # the second turn read only its own tokens
    assert sizes[0] == sizes[1] > plain.last_stats.state_bytes


def test_a_recall_cache_needs_lolcats_layers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.decode.chat import use_recall_cache
    from lolcats_cli.errors import ModelError

    with pytest.raises(ModelError, match="a recall cache needs the model's lolcats attention layers"):
        use_recall_cache(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 8)


def test_the_loop_with_a_real_session_resets_its_history(tiny_chat):
    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, max_new_tokens=3, temperature=0)
    out: list[str] = []
    run_repl(_lines(["hello", "/stats", "/reset", "/stats", "/quit"]), out.append, session)
    text = "".join(out)
    assert "last reply: " in text and "no reply yet" in text
    assert session.history == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")],
)
def test_bad_sampling_settings_are_named(kwargs, message):
    with pytest.raises(LolcatsError, match=message):
        ChatSession(object(), object(), **kwargs)


def test_a_folder_that_is_neither_a_run_nor_an_export_is_refused(tmp_path):
    from lolcats_cli.core.decode.chat import load_chat_model

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LolcatsError, match="neither a lolcats run directory.*notes.txt") as err:
        load_chat_model(tmp_path)
    assert "lolcats export --format hf" in err.value.hint
    with pytest.raises(LolcatsError, match="does not exist"):
        load_chat_model(tmp_path / "missing")


# --------------------------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lolcats_cli", *args]


def test_cli_module_does_not_import_torch():
    code = "import sys, lolcats_cli.cli.chat; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prompt_flag_prints_only_the_reply(tiny_run, tiny_chat):
    model, tokenizer = tiny_chat
    expected = "".join(ChatSession(model, tokenizer, max_new_tokens=6, temperature=0).reply("hello"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        _cli("chat", str(tiny_run), "-p", "hello", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"),
        capture_output=True, text=True, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert "loading" in proc.stderr
    proc = subprocess.run(
        _cli("chat", str(tiny_run), "-p", "hello", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu",
             "--recall", "512"),
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "recall cache: 512 exact keys per KV head in each of 2 layers" in proc.stderr and proc.stdout.strip()


# ----------------------------------------------------------------------- SmolLM2 in a pseudo-terminal


@pytest.mark.slow
def test_interactive_chat_with_smollm2_in_a_terminal(smollm2_gguf, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides
    from lolcats_cli.core.train.transfer import run_transfer

    recipe = Recipe.from_dict(apply_overrides(Recipe().to_dict(), [
        "model.name=smollm2-135m", "data.dataset=pydoc", "data.seq_len=160", "data.max_samples=10", "data.holdout=2",
        "data.num_eval_sequences=1", "transfer.max_steps=1", "transfer.grad_accum=1", "transfer.eval_every=1",
    ]))  # fmt: skip
    run = tmp_path / "smol"
    run_transfer(recipe, run, device="cpu")

    transcript = tmp_path / "transcript.txt"
    with transcript.open("w") as log:
        args = _cli("chat", str(run), "--temperature", "0", "--max-new-tokens", "24", "--device", "cpu")
        child = pexpect.spawn(
            args[0], args[1:],
            env=dict(os.environ, COLUMNS="120", TERM="dumb"), encoding="utf-8", timeout=600, dimensions=(50, 120),
        )
        child.logfile_read = log
        child.expect("/quit or Ctrl-D to leave")
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect("lolcats")
        child.expect("\n> ")  # the reply streamed, then the next prompt
        reply = child.before.strip()
        child.sendline("/stats")
        child.expect(r"state memory ([\d.]+) MiB \(constant-size state in 30/30 layers\); "
                     r"a softmax KV cache at (\d+) tokens: ([\d.]+) MiB")  # fmt: skip
        state_mib, tokens, kv_mib = float(child.match.group(1)), int(child.match.group(2)), float(child.match.group(3))
        child.expect("> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
    print(transcript.read_text())
    assert child.exitstatus == 0
    assert reply, "no reply text"
    assert state_mib > 0 and tokens > 20
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, float32 on CPU
    assert kv_mib == pytest.approx(2 * 30 * 3 * 64 * tokens * 4 / 2**20, abs=0.01)


def test_eval_and_chat_refuse_a_recall_cache_over_delta_rule_layers_and_eval_restores_kernels(tiny_model_dir):
    """Both places that put the recall kernel in (eval's recall row, chat --recall) refuse delta-rule layers with
    the same error and their own hint; eval's context puts each layer's kernel choice back afterwards."""
    from transformers import AutoModelForCausalLM

    from lolcats_cli.core.decode.chat import use_recall_cache
    from lolcats_cli.core.eval.eval_rows import recall_kernel
    from lolcats_cli.core.model.convert import convert_model
    from lolcats_cli.errors import ModelError
    from lolcats_cli.kernels.recall import RecallKernel

    delta = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), window="terrace",
                          window_params={"size": 4, "sinks": 2}, decay=True, delta_rule=True)  # fmt: skip
    with pytest.raises(ModelError, match="delta-rule state") as chat_err:
        use_recall_cache(delta, 8)
    with pytest.raises(ModelError, match="delta-rule state") as eval_err:
        with recall_kernel(delta, 8):
            pass
    assert "chat without --recall" in str(chat_err.value.hint) and "evaluate without --recall" in str(eval_err.value.hint)
    plain = convert_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), window="terrace",
                          window_params={"size": 4, "sinks": 2})  # fmt: skip
    layers = [m for m in plain.modules() if hasattr(m, "_kernel")]
    before = [type(m.kernel) for m in layers]
    with recall_kernel(plain, 8):
        assert all(isinstance(m.kernel, RecallKernel) for m in layers)
    assert [type(m.kernel) for m in layers] == before
