#!/bin/bash
# Session 7, call E (BENCHMARKS.md): TRL vs rlhf GRPO 0.5b 2 x 8 x 128 on the last engine build,
# one call. Same folder layout as session7_call_c.sh: bash D/session7_call_e.sh D
set -u
D="${1:-.}"
xz -dc "$D/rlhf.xz" > /tmp/rlhf; chmod +x /tmp/rlhf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site  # bitsandbytes 0.50.2 without its ROCm and pre-12.8 CUDA libraries
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
G="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $G 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $G 2>/dev/null | tail -1
