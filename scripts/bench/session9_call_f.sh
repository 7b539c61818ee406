#!/bin/bash
# Session 9, call F (BENCHMARKS.md): the q/k/v, o and down groups' LoRA up-projections as a
# launch of their own (`kernels::lora_up_add`) instead of inside RoPE and the RMSNorms. Decode
# checks and ablation, GRPO 0.5b (ours only: device time). Folder D as in session9_call_a.sh.
set -u
D="${1:-.}"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
echo "== decode mma"; /tmp/decode_check /tmp/m05 16 64 64 2>&1 | tail -3
echo "== decode mma 40 rows"; /tmp/decode_check /tmp/m05 40 16 16 2>/dev/null | tail -1
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO 2>&1 | grep -v "^step\|^\[" | tail -2
