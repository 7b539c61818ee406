#!/bin/bash
# Session 10, call H (BENCHMARKS.md): the register-operand NF4 MMA (`nf4_mma::warp_columns`,
# m16n8k16 with A and B built in registers, no shared-memory tile): decode checks at 16, 40 and
# 3 rows, ablation, GRPO 0.5b (ours), Nsight Compute per launch of one block's four groups, and
# the 8b decode. Folder D as in session9_call_a.sh; reports into $OUT.
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
RLHF_NO_DECODE_GRAPH=1 timeout 120 /usr/local/cuda/bin/ncu --csv --cache-control all -k 'regex:^nf4_mma_group' --launch-skip 96 --launch-count 8 --metrics "$M" /tmp/decode_check /tmp/m05 16 64 3 > "$OUT/ncu_h.csv" 2>/dev/null
python3 - "$OUT/ncu_h.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; rows = rows[1:]
ii, mi, vi = h.index("ID"), h.index("Metric Name"), h.index("Metric Value")
by = collections.defaultdict(dict)
for r in rows: by[int(r[ii])][r[mi]] = r[vi]
for i in sorted(by): print(i, {k.split("__")[1][:22]: v for k, v in by[i].items()})
PY
wait $M8; tail -1 /tmp/m8.log
echo "== 8b mma 16"; /tmp/decode_check /tmp/m8 16 64 16 2>&1 | grep -v "^ *[0-9]*: \|^step\|Stack\|^$" | tail -4
echo "== 8b ablate"; ABLATE=1 /tmp/decode_check /tmp/m8 16 64 16 2>/dev/null
