#!/bin/bash
# Session 7, call B (BENCHMARKS.md). Run from a folder D holding rlhf.xz (this build), rlhf_prev.xz (the build before the cubecl-common patch), train_ops_check.xz, decode_check.xz (cargo build --release --features cuda; stripped, xz), make_model.py + trl_baseline.py (../shared/bench/), maxmem.awk, rm05.toml, ppo05.toml (this folder), with .whl/ in the working directory (the TRL wheels of ../shared/bench/README.md; bitsandbytes as bnb_trim.zip, its wheel without the ROCm and pre-12.8 CUDA libraries, to stay under the 64 MiB carry): bash D/session7_call_b.sh D
# Session 7, call B: the fixed reentrant-mutex build (rlhf) against the device-thread build
# (rlhf_prev), both against TRL in one call; decode/train_ops checks of the new build; live
# allocations by size at the labelled high points (tiny, 0.5b, 1.5b DPO) for the planner.
set -u
D="${1:-.}"
for b in rlhf rlhf_prev train_ops_check decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m zipfile -e .whl/bnb_trim.zip /tmp/site  # bitsandbytes 0.50.2 without its ROCm and pre-12.8 CUDA libraries
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 "$D/make_model.py" --size tiny --out /tmp/mt 2>/dev/null | tail -1
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
r() { local bin=$1; shift; echo "== $bin $*"; /tmp/$bin bench --device cuda "$@" 2>&1 | tail -1; }
t() { echo "== trl $*"; python3 "$D/trl_baseline.py" "$@" 2>/dev/null | tail -1; }
r rlhf --model /tmp/mt --algo dpo --batch 2 --max-length 256 --steps 1 --warmup 1 | tee /tmp/smoke.txt
grep -q sec_per_step /tmp/smoke.txt || { RUST_BACKTRACE=1 /tmp/rlhf bench --device cuda --model /tmp/mt --algo dpo --batch 2 --max-length 256 --steps 1 --warmup 1 2>&1 | tail -30; exit 1; }
echo "== decode_check"; /tmp/decode_check /tmp/m05 2>&1 | tail -6
echo "== train_ops_check"; /tmp/train_ops_check /tmp/mt 2>&1 | tail -6
DPO05="--model /tmp/m05 --algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
GRPO05="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
DPO8="--model /tmp/m8 --algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1"
t $DPO05; r rlhf_prev $DPO05; r rlhf $DPO05; r rlhf_prev $DPO05; r rlhf $DPO05
t $GRPO05; r rlhf_prev $GRPO05; r rlhf $GRPO05
mkdir -p "$OUT"
python3 "$D/make_model.py" --size 1.5b --out /tmp/m15 2>/dev/null | tail -1
for m in mt m05 m15; do
  RLHF_TRACE_MEM=1 RLHF_TRACE_ALLOCS=1 /tmp/rlhf bench --device cuda --model /tmp/$m --algo dpo --batch 8 --max-length 256 --steps 1 --warmup 1 > "$OUT/diag_$m.txt" 2>&1
  echo "diag $m: $(grep -c . "$OUT/diag_$m.txt") lines"; tail -1 "$OUT/diag_$m.txt"
done
python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 2>/dev/null | tail -1
t $DPO8; r rlhf_prev $DPO8; r rlhf $DPO8
