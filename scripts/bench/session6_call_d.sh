#!/bin/bash
# Session 6, call D: the fused decode at 32 rows (decode_check against the ordinary path), and a
# 32-row GRPO step before (call C's build, 16-row limit) and after (64-row limit).
set -u
D="${1:-.}"
for f in "$D"/*.xz; do xz -dc "$f" > /tmp/$(basename "$f" .xz); chmod +x /tmp/$(basename "$f" .xz); done
nvidia-smi --query-gpu=name --format=csv,noheader
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
/tmp/decode_check /tmp/m05 32 64 64 2>&1 | grep "check\|rror\|panic"
/tmp/decode_check /tmp/m05 64 32 32 2>&1 | grep "check\|rror\|panic"
for b in rlhf_c rlhf; do
  echo "== $b"
  RLHF_TRACE=1 /tmp/$b bench --model /tmp/m05 --algo grpo --prompts 4 --group 8 --completion-len 256 --steps 2 --warmup 1 --device cuda 2>&1 | grep "generate:\|sec_per_step\|rror" | tail -3
done
/tmp/rlhf bench --model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1 --device cuda 2>&1 | grep "sec_per_step"
