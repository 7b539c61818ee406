#!/bin/bash
# Session 11, call C: as call B, with the RMSNorm computing z in its sum-of-squares pass, attention
# loading its LoRA A first (4 keys per pass again), the down LoRA summed by SwiGLU (atomics, zeroed by the
# post-attention RMSNorm): no LoRA cubes, no lora_up_add launches on the MMA path.
# GRPO ours, Nsight per kernel of one layer, 8b ablation.
set -u
D="${1:-.}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
for b in rlhf decode_check; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
(python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 > /tmp/m8.log 2>&1) & M8=$!
f() { grep -v "^ *[0-9]*: \|^step\|Stack\|^$" | tail -4; }
echo "== mma 16"; /tmp/decode_check /tmp/m05 16 64 64 2>&1 | f
echo "== mma 40"; /tmp/decode_check /tmp/m05 40 16 16 2>&1 | f
echo "== mma 3"; /tmp/decode_check /tmp/m05 3 16 16 2>&1 | f
echo "== mma 16 no adapter"; NO_ADAPTER=1 /tmp/decode_check /tmp/m05 16 64 32 2>&1 | f
echo "== dequant 16"; RLHF_DECODE_DEQUANT=1 /tmp/decode_check /tmp/m05 16 64 32 2>&1 | f
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
/tmp/rlhf bench --device cuda $GRPO 2>&1 | grep -v "^step\|^\[" | tail -1
echo "== ncu one layer"
M2=gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread
RLHF_NO_DECODE_GRAPH=1 timeout 150 /usr/local/cuda/bin/ncu --csv --cache-control none -k 'regex:^(rms_norm_rows|nf4_mma_group|lora_up_add|rope_append|decode_attention|silu_mul)' --launch-skip 200 --launch-count 20 --metrics "$M2" /tmp/decode_check /tmp/m05 16 64 3 > "$OUT/ncu_layer.csv" 2>/dev/null
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
