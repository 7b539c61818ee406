#!/bin/bash
# Session 9, call B (BENCHMARKS.md): the NF4 MMA decode kernel with up to 12 planes per cube and
# the next chunk prefetched, LoRA up-projections unrolled over a compile-time width, attention
# scoring and summing four keys at a time. Decode checks (both decode paths), the ablation, TRL
# vs rlhf GRPO 0.5b. Folder D as in session9_call_a.sh; .whl/ here.
set -u
D="${1:-.}"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
echo "== decode mma"; /tmp/decode_check /tmp/m05 16 64 64 2>&1 | tail -3
echo "== decode dequant"; RLHF_DECODE_DEQUANT=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null | tail -1
echo "== decode mma 40 rows"; /tmp/decode_check /tmp/m05 40 16 16 2>/dev/null | tail -1
echo "== decode mma 3 rows"; /tmp/decode_check /tmp/m05 3 16 16 2>/dev/null | tail -1
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
echo "== ablate dequant"; RLHF_DECODE_DEQUANT=1 ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -3
echo "== grpo dequant"; RLHF_DECODE_DEQUANT=1 /tmp/rlhf bench --device cuda $GRPO 2>/dev/null | tail -1
