#!/bin/bash
# Session 8, call A (BENCHMARKS.md): where the fused decode step's time goes (each launch class
# left out in turn, with and without the CUDA graph), the fused AdamW / gradient-norm check, and
# DPO 0.5b + GRPO 0.5b with phase times, the new build against the previous one (rlhf_old).
# Folder D holds rlhf.xz, rlhf_old.xz, decode_check.xz, train_ops_check.xz, make_model.py.
set -u
D="${1:-.}"
for b in rlhf rlhf_old decode_check train_ops_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
/tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
ABLATE=1 RLHF_NO_DECODE_GRAPH=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
/tmp/train_ops_check /tmp/m05 2 64 2>/dev/null
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
for i in 1 2; do
  /tmp/rlhf_old bench --device cuda $DPO 2>/dev/null | tail -1
  /tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
done
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
/tmp/rlhf_old bench --device cuda $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -5
