#!/bin/bash
# Session 10, call K (BENCHMARKS.md): the committed NF4 MMA (call H's kernel, rebuilt from
# source after calls I and J's variants were dropped): decode check at 16 rows and ablation.
# Folder D as in session9_call_a.sh.
set -u
D="${1:-.}"
xz -dc "$D/decode_check.xz" > /tmp/decode_check; chmod +x /tmp/decode_check
python3 "$D/make_model.py" --size 0.5b --out /tmp/m05 2>/dev/null | tail -1
/tmp/decode_check /tmp/m05 16 64 64 2>&1 | grep -v "^ *[0-9]*: \|^step\|Stack\|^$" | tail -4
ABLATE=1 /tmp/decode_check /tmp/m05 16 64 64 2>/dev/null
