#!/bin/bash
# Session 7, call D (BENCHMARKS.md): the calibration runs still measured on session 6's build
# (8b DPO and GRPO, tiny GRPO, 1.5b GRPO) re-measured on the last engine build, and TRL vs rlhf
# DPO 8b b4x512 in the same call. Same folder layout as session7_call_c.sh: bash D/session7_call_d.sh D
set -u
D="${1:-.}"
xz -dc "$D/rlhf.xz" > /tmp/rlhf; chmod +x /tmp/rlhf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site  # bitsandbytes 0.50.2 without its ROCm and pre-12.8 CUDA libraries
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
b() { echo "== cal $*"; RLHF_TRACE_MEM=1 /tmp/rlhf bench --device cuda "$@" 2>&1 | awk -f "$D/maxmem.awk"; }
python3 "$D/make_model.py" --size tiny --out /tmp/mt 2>/dev/null | tail -1
b --model /tmp/mt --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
python3 "$D/make_model.py" --size 1.5b --out /tmp/m15 2>/dev/null | tail -1
b --model /tmp/m15 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 2>/dev/null | tail -1
b --model /tmp/m8 --algo grpo --prompts 1 --group 8 --completion-len 64 --steps 1 --warmup 1
python3 "$D/trl_baseline.py" --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1 2>/dev/null | tail -1
b --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1
