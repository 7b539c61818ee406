#!/bin/bash
# Session 8, call D (BENCHMARKS.md): the last engine build (RoPE one cube per (row, head)): decode
# checks and ablation, TRL vs rlhf GRPO 0.5b and DPO 8b in one call, and the 8b calibration runs
# (DPO 4 x 512 doubles as the side-by-side run). Folder D as in session8_call_c.sh; .whl/ here.
set -u
D="${1:-.}"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
(python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 > /tmp/m8.log 2>&1) & M8=$!
/tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -3
wait $M8; tail -1 /tmp/m8.log
b() { echo "== cal $*"; RLHF_TRACE_MEM=1 /tmp/rlhf bench --device cuda "$@" 2>&1 | awk -f "$D/maxmem.awk" | grep -v "^step\|loss"; }
python3 "$D/trl_baseline.py" --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1 2>/dev/null | tail -1
b --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1
b --model /tmp/m8 --algo grpo --prompts 1 --group 8 --completion-len 64 --steps 1 --warmup 1
