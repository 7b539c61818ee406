#!/bin/bash
# Session 11, call D (BENCHMARKS.md): main (c73bc11's source) against TRL in one call: GRPO 0.5b
# 2 x 8 x 128 and DPO 0.5b 8 x 256; the decode check and ablation at 16 rows on main, and the
# ablation of wip/lora-early's build (decode_check_le.xz) on the same machine. Folder D holds the
# binaries; .whl/ here.
set -u
D="${1:-.}"
for b in rlhf decode_check decode_check_le; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
echo "== decode main"; /tmp/decode_check /tmp/m05 16 64 64 2>&1 | grep -v "^ *[0-9]*: \|^step\|Stack\|^$" | tail -3
for i in 1 2; do
  echo "== ablate main"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
  echo "== ablate lora-early"; ABLATE=1 /tmp/decode_check_le /tmp/m05 16 64 64 2>/dev/null
done
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $GRPO 2>&1 | grep -v "^step\|^\[" | tail -1
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
python3 "$D/trl_baseline.py" $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
