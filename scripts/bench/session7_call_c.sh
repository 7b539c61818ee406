#!/bin/bash
# Session 7, call C (BENCHMARKS.md). Run from a folder D holding rlhf.xz (cargo build --release --features cuda; stripped, xz), make_model.py + trl_baseline.py (../shared/bench/), maxmem.awk, rm05.toml, ppo05.toml (this folder), with .whl/ in the working directory (the TRL wheels of ../shared/bench/README.md; bitsandbytes as bnb_trim.zip, its wheel without the ROCm and pre-12.8 CUDA libraries, to stay under the 64 MiB carry): bash D/session7_call_c.sh D
# Session 7, call C (last engine build: contiguous bf16 weights and checkpoints): re-measure the
# calibration runs the change can move (the 0.5b model, whose bf16 rows were pitched; tiny and
# 1.5b as controls), and TRL vs rlhf DPO 0.5b b8x256 once more.
set -u
D="${1:-.}"
xz -dc "$D/rlhf.xz" > /tmp/rlhf; chmod +x /tmp/rlhf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site  # bitsandbytes 0.50.2 without its ROCm and pre-12.8 CUDA libraries
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
python3 "$D/make_model.py" --size tiny --out /tmp/mt 2>/dev/null | tail -1
python3 "$D/make_model.py" --size 0.5b --prompt-len 256 --completion-len 256 --rows 64 --out /tmp/m05l 2>/dev/null | tail -1
b() { echo "== cal $*"; RLHF_TRACE_MEM=1 /tmp/rlhf bench --device cuda "$@" 2>&1 | awk -f "$D/maxmem.awk"; }
python3 "$D/trl_baseline.py" --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2 2>/dev/null | tail -1
b --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2
b --model /tmp/m05l --algo dpo --batch 4 --max-length 512 --steps 2 --warmup 1
b --model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
b --model /tmp/m05 --algo grpo --prompts 4 --group 8 --completion-len 256 --steps 1 --warmup 1
echo "== cal ppo 0.5b"
/tmp/rlhf rm --config "$D/rm05.toml" 2>&1 | tail -1
(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/smi_ppo.txt) & SMI=$!
RLHF_TRACE_MEM=1 /tmp/rlhf ppo --config "$D/ppo05.toml" 2>&1 | awk -f "$D/maxmem.awk" | grep "^mem\|in use\|rror"
kill $SMI; echo "ppo nvidia-smi max MiB: $(sort -n /tmp/smi_ppo.txt | tail -1)"
b --model /tmp/mt --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
python3 "$D/make_model.py" --size 1.5b --out /tmp/m15 2>/dev/null | tail -1
b --model /tmp/m15 --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
mkdir -p "$OUT"
RLHF_TRACE_MEM=1 RLHF_TRACE_ALLOCS=1 /tmp/rlhf bench --device cuda --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 1 --warmup 1 > "$OUT/diag_m05.txt" 2>&1; tail -1 "$OUT/diag_m05.txt"
