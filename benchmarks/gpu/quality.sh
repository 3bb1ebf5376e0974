# benchmarks/quality.py on SmolLM2 (env: VARIANTS, DROP = variants to train again, QARGS); $1: budget seconds.
# Carry .whl, .smol/smol.part.ab and .gpz; part aa must be in /root/smol/ already (decode.sh puts it there).
set -o pipefail
. benchmarks/gpu/env.sh
mkdir -p $ROOT/.gpu && for f in train heldout; do
  [ -f $ROOT/.gpu/$f.txt ] || gunzip -c $ROOT/.gpz/$f.txt.gz > $ROOT/.gpu/$f.txt; done
cd /root/smol || { echo "part aa is gone: the machine was replaced"; exit 3; }
[ -f smol.gguf ] || { cp $ROOT/.smol/smol.part.ab . && cat smol.part.aa smol.part.ab > smol.gguf && rm smol.part.a?; }
cd $ROOT && mkdir -p /root/q
[ -f /root/q/quality.json ] || python3 - <<PY
import json
r = json.load(open("benchmarks/results/quality-smollm2-h200.json"))
for v in "${DROP}".split(","):
    r.get("variants", {}).pop(v, None)
json.dump(r, open("/root/q/quality.json", "w"), indent=1)
PY
timeout $(( ${1:-540} + 30 )) python3 benchmarks/quality.py --model /root/smol/smol.gguf --train $ROOT/.gpu/train.txt \
  --heldout $ROOT/.gpu/heldout.txt --out /root/q --variants $VARIANTS --budget-s ${1:-540} $QARGS 2>&1 \
  | grep -v "it/s\]\|s/it\]" | tail -70
cp /root/q/quality.json /root/q/*.md $OUT/ 2>/dev/null
cd /root/q && tar czf - --exclude=checkpoints --exclude=blocks */transfer */finetune 2>/dev/null \
  | split -b 15M - $OUT/runs.tgz.; ls -la $OUT
