# CUDA decode tests, the 8B decode grid with kernel lists, bf16 state across contexts, prefill against softmax
# (unpadded and left-padded).
# Carry .whl and .smol/smol.part.aa (copied to /root/smol/ for quality.sh). The compiled engines run in their own
# process (a process that had compiled two engines once ended with a segmentation fault on the next row).
set -o pipefail
. benchmarks/gpu/env.sh
mkdir -p /root/smol && cp .smol/smol.part.aa /root/smol/ 2>/dev/null &
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
for m in typer rich questionary safetensors gguf fla; do python3 -c "import $m" 2>/dev/null || echo "MISSING $m"; done
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_step.py \
  tests/kernels/test_triton_mse.py tests/kernels/test_triton_featuremap.py tests/core/decode/test_static_decode.py \
  tests/kernels/test_triton_model.py \
  "tests/kernels/test_triton_hybrid.py::test_the_fused_prefill_gives_the_chunked_prefills_output_and_state" \
  2>&1 | tee $OUT/tests.txt | tail -3
G="python3 benchmarks/generation.py --preset llama-3.1-8b --random-weights --decay"
timeout 100 $G --contexts 4096 --prefill synthetic --batch-sizes 1 256 --engines hybrid-static --kernels 12 \
  --json $OUT/gen-static.json 2>&1 | tee $OUT/gen-static.txt | grep -v "^\s*$" | tail -30
timeout 130 $G --contexts 4096 --prefill synthetic --batch-sizes 1 --engines hybrid-static-compiled softmax-compiled \
  --kernels 12 --json $OUT/gen-compiled.json 2>&1 | tee $OUT/gen-compiled.txt | grep -v "^\s*$" | tail -30
LOLCATS_STATE_DTYPE=bf16 timeout 130 $G --contexts 1024 4096 16384 --prefill synthetic --batch-sizes 256 \
  --engines hybrid-static --json $OUT/gen-bf16.json 2>&1 | tail -12
timeout 110 $G --contexts 4096 --prefill real --prefill-warmup --prefill-chunk 4096 --batch-sizes 1 16 \
  --engines hybrid-static softmax-compiled --steps 8 --no-profile --json $OUT/gen-prefill.json 2>&1 | tail -12
# left-padded prompts (4096 down to 2048 tokens): the fused prefill of padded rows against softmax's masked prefill
timeout 110 $G --contexts 4096 --prefill real --prefill-warmup --prefill-chunk 4096 --batch-sizes 16 \
  --pad-fraction 0.5 --engines hybrid-static softmax-compiled --steps 8 --no-profile --json $OUT/gen-padded.json \
  2>&1 | tail -8
wait
