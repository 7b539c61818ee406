#!/bin/bash
# Session 11, call F (BENCHMARKS.md): the grouped training projections (q/k/v and gate/up: one
# bf16 cast, one NF4 dequantization launch, one GEMM per group, forward and input gradient).
# train_ops_check against the f32 CPU backend (the grouped path serves both GPU paths there),
# then DPO 0.5b 8 x 256: main's binary (rlhf.xz) and the grouped build (rlhf_grp.xz) in
# alternation with --phase-times, and TRL once. Folder D holds the binaries; .whl/ here.
set -u
D="${1:-.}"
for b in rlhf rlhf_grp train_ops_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
echo "== train_ops_check (grouped build, CPU_REF)"; CPU_REF=1 timeout 120 /tmp/train_ops_check /tmp/m05 4 64 2>&1 | tail -6
DPO="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
echo "== main"; /tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
echo "== grouped"; /tmp/rlhf_grp bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
echo "== trl"; python3 "$D/trl_baseline.py" $DPO 2>/dev/null | tail -1
echo "== main"; /tmp/rlhf bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
echo "== grouped"; /tmp/rlhf_grp bench --device cuda $DPO --phase-times 2>/dev/null | tail -1
