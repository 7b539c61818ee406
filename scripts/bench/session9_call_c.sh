#!/bin/bash
# Session 9, call C (BENCHMARKS.md): the MMA kernel's LoRA cubes read every row at once (one
# accumulator per row). Decode checks, the ablation, then where the step's time goes per kernel:
# cubecl's profiler over per-kernel launches (RLHF_NO_DECODE_GRAPH=1), and Nsight Compute when
# the image has it. Then TRL vs rlhf GRPO 0.5b. Folder D as in session9_call_a.sh; .whl/ here.
set -u
D="${1:-.}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
echo "== decode mma"; /tmp/decode_check /tmp/m05 16 64 64 2>&1 | tail -3
echo "== decode mma 40 rows"; /tmp/decode_check /tmp/m05 40 16 16 2>/dev/null | tail -1
echo "== decode mma 3 rows"; /tmp/decode_check /tmp/m05 3 16 16 2>/dev/null | tail -1
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
echo "== ablate dequant"; RLHF_DECODE_DEQUANT=1 ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
echo "== profile (per-kernel launches)"
RLHF_NO_DECODE_GRAPH=1 CUBECL_DEBUG_LOG="$OUT/prof_decode.log" CUBECL_DEBUG_OPTION=profile /tmp/decode_check /tmp/m05 16 64 8 2>/dev/null | tail -1
which ncu nsys 2>&1 | head -2; ls -d /usr/local/cuda*/ /opt/nvidia/nsight-compute* 2>/dev/null | head
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  RLHF_NO_DECODE_GRAPH=1 timeout 150 "$NCU" --print-summary per-kernel -k 'regex:rms_norm|rope_append|decode_attention|nf4_mma|silu_mul|sample_rows|embed_rows|gemm|Kernel' --launch-skip 0 --launch-count 400 /tmp/decode_check /tmp/m05 16 64 2 > "$OUT/ncu_decode.txt" 2>&1; tail -5 "$OUT/ncu_decode.txt"
fi
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
python3 "$D/trl_baseline.py" $GRPO 2>/dev/null | tail -1
RLHF_TRACE=1 /tmp/rlhf bench --device cuda $GRPO --phase-times 2>&1 | grep -v "^step\|^\[" | tail -3
