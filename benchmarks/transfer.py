"""Stage-1 (attention transfer) throughput: tokens/s of forward + backward + optimizer step.

A benchmark, not a test: it prints numbers. Examples:

    python benchmarks/transfer.py --preset smollm2-135m --random-weights      # shapes of SmolLM2, random init
    python benchmarks/transfer.py --model smollm2-135m                         # the real embedded default
    python benchmarks/transfer.py --preset llama-3.1-8b --random-weights --device cuda --seq-len 1024
    python benchmarks/transfer.py --config path/to/config.json --random-weights --layers 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Architectures of well-known models, so no hub access is needed for --random-weights.
PRESETS = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                       sliding_window=4096),
}


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model:
        from lolcats_cli.core.model.models import load_model
        from lolcats_cli.core.recipe.recipe import Recipe, apply_overrides

        recipe = Recipe.from_dict(apply_overrides(Recipe().to_dict(), [f"model.name={args.model}"]))
        model, _, _ = load_model(recipe.model, device=device)
        return model.to(dtype)
    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
    else:
        cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    src.add_argument("--config", help="a Hugging Face config.json (with model_type)")
    src.add_argument("--model", help="a real model: smollm2-135m, a local folder or a .gguf")
    ap.add_argument("--random-weights", action="store_true", help="random init from the config (the default unless --model)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--feature-map", default="hedgehog")
    ap.add_argument("--window", default="terrace")
    ap.add_argument("--window-size", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--no-gate", dest="gate", action="store_false", help="the paper's linear weight 1, no gate")
    ap.add_argument("--no-decay", dest="decay", action="store_false", help="no decay of the linear branch")
    ap.add_argument("--kernel", default=None, help="a kernel name (chunked, triton, naive); default: the device's")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one-backward", action="store_true",
                    help="one backward of the summed loss after the forward (holds every layer's graph), instead of "
                         "each layer's backward during the forward")
    ap.add_argument("--kernels", type=int, default=0,
                    help="CUDA: also profile one step and print its N most expensive kernels and the GPU-busy time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lolcats_cli.core.model.convert import (
        attention_parameters,
        convert_model,
        freeze_for_transfer,
        linearized_layers,
    )
    from lolcats_cli.core.train.transfer import TransferObjective

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    model = build_model(args, device, dtype)
    convert_model(model, feature_map=args.feature_map, window=args.window, mode="transfer", linear_gate=args.gate,
                  window_params={"size": args.window_size, "sinks": args.sinks}, decay=args.decay)
    freeze_for_transfer(model)
    layers = linearized_layers(model)
    for _, m in layers:
        m.kernel = args.kernel
    params = list(attention_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)
    objective = TransferObjective(model, ids, device, mse_weight=1000.0)
    load_s = time.perf_counter() - t0

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if args.one_backward:
            loss = objective.loss(ids)
            loss.backward()
        else:  # what lolcats transfer runs: each layer's backward as soon as its loss exists
            loss = objective.backward(ids, None, 1.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tokens = args.steps * args.batch_size * args.seq_len
    report = {
        "model": args.model or args.config or args.preset,
        "layers": model.config.num_hidden_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "kernel": layers[0][1].kernel.name,
        "window": f"{args.window} {args.window_size} + {args.sinks} sinks, gate {args.gate}, decay {args.decay}",
        "backward": "one, after the forward" if args.one_backward else "per layer, during the forward",
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "trainable_params": sum(p.numel() for p in params),
        "steps": args.steps,
        "tokens_per_s": round(tokens / dt, 1),
        "s_per_step": round(dt / args.steps, 4),
        "setup_s": round(load_s, 1),
        "last_loss": round(loss, 4),
    }
    if device.type == "cuda":
        report["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if device.type == "cuda" and args.kernels:
        from profiling import gpu_busy_ms

        busy, top = gpu_busy_ms(step, 1, device, args.kernels)
        report["gpu_busy_s_per_step"] = round(busy / 1000, 4)
        report["top_kernels"] = top
    for k, v in report.items():
        if k != "top_kernels":
            print(f"{k:>18}: {v}")
    for name, ms in report.get("top_kernels", []):
        print(f"{ms:10.2f} ms  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
