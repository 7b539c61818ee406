#!/bin/bash
# Session 8, call C (BENCHMARKS.md): the last engine build (fused token log-probs over the vocab,
# LoRA B kept transposed in the decode): checks, decode ablation, TRL vs rlhf DPO 0.5b and GRPO
# 0.5b in one call, and the calibration runs of tiny / 0.5b / 1.5b / PPO on this build.
# Folder D as in session8_call_b.sh, plus maxmem.awk, rm05.toml, ppo05.toml; .whl/ here.
set -u
D="${1:-.}"
for b in rlhf decode_check train_ops_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
/tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
CPU_REF=1 /tmp/decode_check /tmp/m05 2 16 4 2>/dev/null | grep cpu
ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
CPU_REF=1 /tmp/train_ops_check /tmp/m05 2 64 2>/dev/null
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO 2>/dev/null | tail -1
/tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -3
b() { echo "== cal $*"; RLHF_TRACE_MEM=1 /tmp/rlhf bench --device cuda "$@" 2>&1 | awk -f "$D/maxmem.awk"; }
python3 "$D/make_model.py" --size tiny --out /tmp/mt 2>/dev/null | tail -1
python3 "$D/make_model.py" --size 0.5b --prompt-len 256 --completion-len 256 --rows 64 --out /tmp/m05l 2>/dev/null | tail -1
b --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
b --model /tmp/m05l --algo dpo --batch 4 --max-length 512 --steps 2 --warmup 1
b --model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
b --model /tmp/m05 --algo grpo --prompts 4 --group 8 --completion-len 256 --steps 1 --warmup 1
b --model /tmp/mt --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
b --model /tmp/mt --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
echo "== cal ppo 0.5b"
/tmp/rlhf rm --config "$D/rm05.toml" 2>&1 | tail -1
(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/smi_ppo.txt) & SMI=$!
RLHF_TRACE_MEM=1 /tmp/rlhf ppo --config "$D/ppo05.toml" 2>&1 | awk -f "$D/maxmem.awk" | grep "^mem\|in use\|rror"
kill $SMI; echo "ppo nvidia-smi max MiB: $(sort -n /tmp/smi_ppo.txt | tail -1)"
python3 "$D/make_model.py" --size 1.5b --out /tmp/m15 2>/dev/null | tail -1
b --model /tmp/m15 --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1
b --model /tmp/m15 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1
