# CUDA decode tests, the 8B decode grid with kernel lists, bf16 state, prefill against softmax.
# Carry .whl and .smol/smol.part.aa (copied to /root/smol/ for quality.sh).
set -o pipefail
. benchmarks/gpu/env.sh
mkdir -p /root/smol && cp .smol/smol.part.aa /root/smol/ &
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
for m in typer rich questionary safetensors gguf fla; do python3 -c "import $m" 2>/dev/null || echo "MISSING $m"; done
timeout 170 python3 -m pytest -q -p no:cacheprovider -x tests/kernels/test_triton_step.py \
  tests/core/decode/test_static_decode.py 2>&1 | tee $OUT/tests.txt | tail -8
G="python3 benchmarks/generation.py --preset llama-3.1-8b --random-weights --decay --contexts 4096"
timeout 200 $G --prefill synthetic --batch-sizes 1 256 --engines hybrid-static hybrid-static-compiled \
  softmax-compiled --kernels 12 --json $OUT/gen-kern.json 2>&1 | tee $OUT/gen-kern.txt | grep -v "^\s*$" | tail -60
LOLCATS_STATE_DTYPE=bf16 timeout 120 $G --prefill synthetic --batch-sizes 256 1024 --engines hybrid-static \
  --json $OUT/gen-bf16.json 2>&1 | tail -12
timeout 150 $G --prefill real --prefill-warmup --prefill-chunk 4096 --batch-sizes 1 16 \
  --engines hybrid-static softmax-compiled --steps 8 --no-profile --json $OUT/gen-prefill.json 2>&1 | tail -12
wait
