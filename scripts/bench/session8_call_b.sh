#!/bin/bash
# Session 8, call B (BENCHMARKS.md): the fused decode with LoRA up-projections folded into the
# kernels that read each group's output, one dequant launch per group and the attention's value
# sum split over planes: checks (logits vs the ordinary path and vs f32 CPU, GPU sampling,
# training ops incl. SwiGLU), the step without each launch class, then TRL vs rlhf DPO 0.5b and
# GRPO 0.5b in one call, and cubecl's kernel profile of one DPO step (into $OUT).
# Folder D as in session8_call_a.sh, plus trl_baseline.py; .whl/ in the working directory.
set -u
D="${1:-.}"
for b in rlhf decode_check train_ops_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
/tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
CPU_REF=1 /tmp/decode_check /tmp/m05 2 16 4 2>/dev/null
ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
/tmp/train_ops_check /tmp/m05 2 64 2>/dev/null
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -5
mkdir -p "$OUT"
CUBECL_DEBUG_LOG="$OUT/cubecl_profile_dpo.log" CUBECL_DEBUG_OPTION=profile /tmp/rlhf bench --device cuda --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 1 --warmup 1 2>/dev/null | tail -1
ls -la "$OUT"
