#!/bin/bash
# Session 9, call A (BENCHMARKS.md): the decode projections read NF4 directly with tensor cores
# (`cuda::nf4_mma`). Decode checks with and without it (RLHF_DECODE_DEQUANT=1 keeps dequantize +
# cuBLASLt), a multi-tile row count, the ablation, TRL vs rlhf GRPO 0.5b (both decode paths), and
# DPO 0.5b runs around a cleared autotune cache (why is the first run after TRL's slower?).
# Folder D holds rlhf.xz, decode_check.xz, make_model.py, trl_baseline.py; .whl/ here.
set -u
D="${1:-.}"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
echo "== decode mma"; /tmp/decode_check /tmp/m05 16 64 64 2>&1 | tail -4
echo "== decode dequant"; RLHF_DECODE_DEQUANT=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null | tail -3
echo "== decode mma 40 rows"; /tmp/decode_check /tmp/m05 40 16 16 2>/dev/null | tail -3
echo "== decode mma 3 rows"; /tmp/decode_check /tmp/m05 3 16 16 2>/dev/null | tail -3
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -3
echo "== grpo dequant"; RLHF_DECODE_DEQUANT=1 /tmp/rlhf bench --device cuda $GRPO 2>/dev/null | tail -1
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
echo "== dpo: cache kept, kept, cleared, kept"
ls target/autotune 2>/dev/null | head; du -sh target/autotune 2>/dev/null
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
rm -rf target/autotune
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
python3 "$D/trl_baseline.py" $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
