#!/bin/bash
# Session 6, call C (BENCHMARKS.md). Run from a folder D holding rlhf.xz (cargo build --release --features cuda --bin rlhf; stripped, xz), make_model.py + trl_baseline.py (../shared/bench/), maxmem.awk, rm05.toml, ppo05.toml (this folder), with .whl/ (TRL wheels) in the working directory: bash D/session6_call_c.sh D
# TRL vs rlhf DPO (8b, 0.5b) in one call, then the planner calibration runs (rlhf only).
set -u
D="${1:-.}"
xz -dc "$D/rlhf.xz" > /tmp/rlhf; chmod +x /tmp/rlhf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 2>/dev/null | tail -1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
python3 "$D/make_model.py" --size tiny --out /tmp/mt 2>/dev/null | tail -1
python3 "$D/make_model.py" --size 1.5b --out /tmp/m15 2>/dev/null | tail -1
python3 "$D/make_model.py" --size 0.5b --prompt-len 256 --completion-len 256 --rows 64 --out /tmp/m05l 2>/dev/null | tail -1
b() { echo "== cal $*"; RLHF_TRACE_MEM=1 /tmp/rlhf bench --device cuda "$@" 2>&1 | awk -f "$D/maxmem.awk"; }
python3 "$D/trl_baseline.py" --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1 2>/dev/null | tail -1
b --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1
python3 "$D/trl_baseline.py" --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2 2>/dev/null | tail -1
b --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2
b --model /tmp/m8 --algo grpo --prompts 1 --group 8 --completion-len 64 --steps 1 --warmup 1
b --model /tmp/mt --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
b --model /tmp/mt --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
b --model /tmp/m05l --algo dpo --batch 4 --max-length 512 --steps 2 --warmup 1
b --model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
b --model /tmp/m05 --algo grpo --prompts 4 --group 8 --completion-len 256 --steps 1 --warmup 1
b --model /tmp/m15 --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
b --model /tmp/m15 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
echo "== cal ppo 0.5b"
/tmp/rlhf rm --config "$D/rm05.toml" 2>&1 | tail -1
(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/smi_ppo.txt) & SMI=$!
RLHF_TRACE_MEM=1 /tmp/rlhf ppo --config "$D/ppo05.toml" 2>&1 | awk -f "$D/maxmem.awk" | grep "^mem\|in use\|rror"
kill $SMI; echo "ppo nvidia-smi max MiB: $(sort -n /tmp/smi_ppo.txt | tail -1)"
