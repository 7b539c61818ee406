#!/bin/bash
# Session 9, call E (BENCHMARKS.md): Nsight Compute over the fused decode's kernels (the last
# build, per-kernel launches with RLHF_NO_DECODE_GRAPH=1, caches not flushed), to see which of a
# block's 9 launches are slow and why. Folder D as in session9_call_a.sh; results into $OUT.
set -u
D="${1:-.}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
xz -dc "$D/decode_check.xz" > /tmp/decode_check; chmod +x /tmp/decode_check
export PYTHONPATH=/tmp/site
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
K='regex:^(nf4_mma_group|rms_norm_rows|rope_append|decode_attention|silu_mul|sample_rows|embed_rows)'
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
RLHF_NO_DECODE_GRAPH=1 timeout 300 /usr/local/cuda/bin/ncu --csv --cache-control none -k "$K" --launch-skip 230 --launch-count 230 --metrics "$M" /tmp/decode_check /tmp/m05 16 64 3 > "$OUT/ncu_fused.csv" 2> "$OUT/ncu_err.txt"
echo "rc $?"; wc -l "$OUT/ncu_fused.csv"; tail -3 "$OUT/ncu_err.txt"
python3 - "$OUT/ncu_fused.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; rows = rows[1:]
ki, mi, vi, ui = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value"), h.index("Metric Unit")
ii = h.index("ID")
by = collections.defaultdict(dict)
for r in rows:
    by[(r[ii], r[ki])][r[mi]] = (r[vi], r[ui])
agg = collections.defaultdict(list)
for (i, k), m in by.items():
    agg[(k, m.get("launch__grid_size", ("?",))[0])].append(m)
for (k, g), ms in sorted(agg.items()):
    def med(name):
        v = sorted(float(m[name][0].replace(",", "")) for m in ms if name in m)
        return v[len(v) // 2] if v else float("nan")
    u = ms[0].get("gpu__time_duration.sum", ("", "?"))[1]
    print(f"{k[:40]:40s} grid {g:>6s} n {len(ms):3d} time {med('gpu__time_duration.sum'):8.2f} {u} dram_read {med('dram__bytes_read.sum'):10.0f} dram% {med('dram__throughput.avg.pct_of_peak_sustained_elapsed'):5.1f} regs {med('launch__registers_per_thread'):4.0f} warps% {med('sm__warps_active.avg.pct_of_peak_sustained_active'):5.1f} inst {med('smsp__inst_executed.sum'):10.0f}")
PY
