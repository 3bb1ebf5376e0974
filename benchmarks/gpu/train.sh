# Issue 12: the hybrid op against SDPA (with kernel lists), stage 1 on the 8B shape and on SmolLM2's.
# Carry .whl. MAPS="1 0" times the fused hedgehog map (1) and its PyTorch form (0) in the same call.
# Writes attention-map*.json/txt and transfer-*-map*.json/txt to $OUT.
set -o pipefail
. benchmarks/gpu/env.sh
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
for m in ${MAPS:-1}; do
  export LOLCATS_TRITON_MAP=$m
  echo "=== LOLCATS_TRITON_MAP=$m"
  timeout 150 python3 benchmarks/attention_gpu.py --shapes ${SHAPES:-llama smollm2} --lengths 4096 16384 \
    --methods sdpa triton triton+decay --kernels ${KERNELS:-10} --no-check --out $OUT/attention-map$m.json \
    2>&1 | tee $OUT/attention-map$m.txt | grep -v "^  *[0-9.]* ms " | tail -30
  T="python3 benchmarks/transfer.py --random-weights --steps 4 --warmup 2 ${TARGS:-}"  # TARGS=--one-backward: baseline
  for b in ${LLAMA_BATCHES:-8 16}; do
    timeout 100 $T --preset llama-3.1-8b --seq-len 1024 --batch-size $b --kernels 15 \
      --json $OUT/transfer-8b-b$b-map$m.json 2>&1 | tee $OUT/transfer-8b-b$b-map$m.txt | tail -24
  done
  for b in ${SMOL_BATCHES:-8 32 64}; do
    timeout 60 $T --preset smollm2-135m --seq-len 1024 --batch-size $b --kernels 15 \
      --json $OUT/transfer-smol-b$b-map$m.json 2>&1 | tee $OUT/transfer-smol-b$b-map$m.txt | tail -24
  done
done
