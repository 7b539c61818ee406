#!/bin/bash
# Session 8, call E (BENCHMARKS.md): TRL vs rlhf DPO 0.5b b8 x 256 once more on the last build
# (0064287), on whatever host the call gets: how robust call C's ratio is.
set -u
D="${1:-.}"
xz -dc "$D/rlhf.xz" > /tmp/rlhf; chmod +x /tmp/rlhf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
python3 "$D/trl_baseline.py" $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
