#!/bin/bash
# The side-by-side device runs of BENCHMARKS.md (session 5, calls 11 and 12): TRL 1.16 and rlhf
# on the same checkpoint, same GPU, one call each. Run from a folder D (carried to the GPU
# machine) holding:
#   rlhf, decode_check, train_ops_check, qlinear_check   (cargo build --release --features cuda
#       --bin rlhf --example decode_check --example train_ops_check --example qlinear_check;
#       stripped and xz'd)
#   make_model.py, trl_baseline.py     (../shared/bench/), cublas.py (this folder)
#   .whl/                              (TRL and bitsandbytes wheels, ../shared/bench/README.md)
# as `bash D/device_call.sh D` (the 0.5b call) or `bash D/device_call.sh D 8b` (the 8b DPO call).
set -u
D="${1:-.}"
SIZE="${2:-0.5b}"
for f in "$D"/*.xz; do xz -dc "$f" > /tmp/$(basename "$f" .xz); chmod +x /tmp/$(basename "$f" .xz); done
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$D"/.whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
if [ "$SIZE" = 8b ]; then
  python3 "$D/make_model.py" --size 8b --out /tmp/m8 | tail -1
  python3 "$D/trl_baseline.py" --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1 2>/dev/null | tail -1
  RLHF_TRACE_MEM=1 /tmp/rlhf bench --model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1 --device cuda 2>&1 | grep "^mem\|sec_per_step"
  exit
fi
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 | tail -1
/tmp/decode_check /tmp/m05 16 64 64 2>&1 | grep "check\|Error"
CPU_REF=1 /tmp/decode_check /tmp/m05 2 16 4 2>&1 | grep "check\|Error"
CPU_REF=1 /tmp/train_ops_check /tmp/m05 2 64 2>&1 | grep "check\|Error"
python3 "$D/trl_baseline.py" --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2 2>/dev/null | tail -1
/tmp/rlhf bench --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2 --device cuda 2>/dev/null | tail -1
python3 "$D/trl_baseline.py" --model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1 --device cuda 2>&1 | grep "generate:\|sec_per_step" | tail -2
# Where the DPO step's memory peaks (the labelled high points, largest per label).
RLHF_TRACE_MEM=1 /tmp/rlhf bench --model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2 --device cuda 2>&1 | grep "^mem\|sec_per_step" | sort | uniq | tail -12
# GEMM 4096^3 against torch's cuBLAS (session 4, call 7: these two lines twice, alternating).
python3 "$D/cublas.py"
/tmp/qlinear_check 2>&1 | grep "qlinear_4096\|gemv16\|worst"
