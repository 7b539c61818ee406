#!/bin/bash
# Session 10, call G (BENCHMARKS.md): the first GPU run of 08cecc1 (LoRA up-projections of
# q/k/v, o and down through kernels::lora_up_add on both decode paths): decode checks on the MMA
# and the dequantize path at 16, 40 and 3 rows, GRPO 0.5b (ours), then Nsight Compute's full set
# over one block's four nf4_mma_group launches (stall reasons); the 8b decode (is the
# same kernel bandwidth-bound where the matrices are large?), and the latency of a device-wide
# dependency (examples/sync_floor.rs). Folder D as in
# session9_call_a.sh; reports into $OUT.
set -u
D="${1:-.}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
for b in rlhf decode_check sync_floor; do xz -dc "$D/$b.xz" > /tmp/$b; chmod +x /tmp/$b; done
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
(python3 "$D/make_model.py" --size 8b --out /tmp/m8 --rows 64 > /tmp/m8.log 2>&1) & M8=$!
for c in 2 132 264; do timeout 30 /tmp/sync_floor $c 2000; done
for p in mma dequant; do
  E=""; [ $p = dequant ] && E="RLHF_DECODE_DEQUANT=1"
  echo "== $p 16"; env $E /tmp/decode_check /tmp/m05 16 64 64 2>&1 | tail -3
  echo "== $p 40"; env $E /tmp/decode_check /tmp/m05 40 16 16 2>&1 | tail -2
  echo "== $p 3"; env $E /tmp/decode_check /tmp/m05 3 16 16 2>&1 | tail -2
done
echo "== ablate"; ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
GRPO="--model /tmp/m05 --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
/tmp/rlhf bench --device cuda $GRPO 2>&1 | grep -v "^step\|^\[" | tail -1
NCU=/usr/local/cuda/bin/ncu
RLHF_NO_DECODE_GRAPH=1 timeout 240 $NCU --set full --import-source yes --cache-control none -k 'regex:^nf4_mma_group' --launch-skip 96 --launch-count 4 -o "$OUT/mma" /tmp/decode_check /tmp/m05 16 64 3 > "$OUT/ncu_log.txt" 2>&1
echo "ncu rc $?"; tail -2 "$OUT/ncu_log.txt"
$NCU --import "$OUT/mma.ncu-rep" --page details > "$OUT/mma_details.txt" 2>&1
$NCU --import "$OUT/mma.ncu-rep" --page raw --csv > "$OUT/mma_raw.csv" 2>&1
$NCU --import "$OUT/mma.ncu-rep" --page source --csv --print-source sass > "$OUT/mma_sass.csv" 2>&1
wait $M8; tail -1 /tmp/m8.log
echo "== 8b mma 16"; /tmp/decode_check /tmp/m8 16 64 16 2>&1 | tail -2
echo "== 8b ablate"; ABLATE=1 /tmp/decode_check /tmp/m8 16 64 16 2>/dev/null
ls -la "$OUT"
