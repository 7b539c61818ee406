#!/bin/bash
# Session 11, call A (BENCHMARKS.md): the two branches session 10 prepared. rlhf and
# decode_check built from wip/mma-pairs (21a9c97: call J's byte -> bf16-pair table of unscaled
# levels, each chunk's MMAs scaled once per column, accumulators a plain local array): decode
# checks at 16, 40 and 3 rows, ablation, GRPO 0.5b (ours), Nsight Compute per MMA launch of one
# block (caches flushed) and per kernel of one block (not flushed), the 8b ablation; then
# sync_floor built from wip/grid-barrier (59f5b07: the fenced grid barrier, data checked).
# Folder D holds the binaries (.xz) and make_model.py; reports into $OUT.
set -u
D="${1:-.}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
(python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 > /tmp/m8.log 2>&1) & M8=$!
echo "== mma 16"; /tmp/decode_check /tmp/m05 16 64 64 > /tmp/d16.txt 2>&1; rc=$?
grep -v "^ *[0-9]*: \|^step\|Stack\|^$" /tmp/d16.txt | tail -4
if [ $rc -ne 0 ] && ! grep -q '"check":"decode"' /tmp/d16.txt; then head -c 3000 /tmp/d16.txt; kill $M8; exit 1; fi
echo "== mma 40"; /tmp/decode_check /tmp/m05 40 16 16 2>&1 | grep -v "^ *[0-9]*: \|^step\|Stack\|^$" | tail -3
echo "== mma 3"; /tmp/decode_check /tmp/m05 3 16 16 2>&1 | grep -v "^ *[0-9]*: \|^step\|Stack\|^$" | tail -3
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
/tmp/rlhf bench --device cuda $GRPO 2>&1 | grep -v "^step\|^\[" | tail -1
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,launch__grid_size,launch__block_size,smsp__inst_executed.sum
RLHF_NO_DECODE_GRAPH=1 timeout 120 /usr/local/cuda/bin/ncu --csv --cache-control all -k 'regex:^nf4_mma_group' --launch-skip 96 --launch-count 4 --metrics "$M" /tmp/decode_check /tmp/m05 16 64 3 > "$OUT/ncu_h.csv" 2>/dev/null
python3 - "$OUT/ncu_h.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; rows = rows[1:]
ii, mi, vi = h.index("ID"), h.index("Metric Name"), h.index("Metric Value")
by = collections.defaultdict(dict)
for r in rows: by[int(r[ii])][r[mi]] = r[vi]
for i in sorted(by): print(i, {k.split("__")[1][:22]: v for k, v in by[i].items()})
PY
echo "== ncu one layer, all decode kernels (caches not flushed)"
M2=gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread
RLHF_NO_DECODE_GRAPH=1 timeout 150 /usr/local/cuda/bin/ncu --csv --cache-control none -k 'regex:^(rms_norm_rows|nf4_mma_group|lora_up_add|rope_append|decode_attention|silu_mul)' --launch-skip 240 --launch-count 24 --metrics "$M2" /tmp/decode_check /tmp/m05 16 64 3 > "$OUT/ncu_layer.csv" 2>/dev/null
python3 - "$OUT/ncu_layer.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; rows = rows[1:]
ii, ki, mi, vi = h.index("ID"), h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value")
by = collections.defaultdict(dict); names = {}
for r in rows: by[int(r[ii])][r[mi]] = r[vi]; names[int(r[ii])] = r[ki][:24]
for i in sorted(by): print(i, names[i], {k.split("__")[1][:14]: v for k, v in by[i].items()})
PY
wait $M8; tail -1 /tmp/m8.log
echo "== 8b ablate"; ABLATE=1 /tmp/decode_check /tmp/m8 16 64 16 2>/dev/null
echo "== grid barrier (wip/grid-barrier)"
xz -dc "$D/sync_floor.xz" > /tmp/sync_floor; chmod +x /tmp/sync_floor
for c in 2 66 132 264; do timeout 60 /tmp/sync_floor $c 2000; echo "rc $?"; done
