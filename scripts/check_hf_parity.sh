#!/usr/bin/env bash
# Checks `rlhf merge` and rlhf's reward scores against transformers + PEFT on the CPU:
#
#     cargo build --example score      # beside the binary (same profile)
#     bash scripts/check_hf_parity.sh target/debug/rlhf [SCORE_BIN]
#
# Needs a Python with torch (CPU is enough), transformers, peft and safetensors (PYTHON, default
# python3). Builds the fixtures (scripts/check_hf_merge.py: a random tiny Llama saved by
# transformers, data, PEFT-made adapters), trains an SFT and a reward adapter with the given
# binary (3 steps at a high learning rate so the adapters move far from zero), merges each adapter
# in f32 (and the causal ones in bf16), scores the reward adapters with rlhf itself (unquantized
# and NF4 base), then runs the checks and prints a summary. WORK (default: a temporary folder)
# keeps everything. Exits 1 if any check fails.
set -euo pipefail

RLHF=$(realpath "${1:?usage: check_hf_parity.sh RLHF_BIN [SCORE_BIN]}")
SCORE=$(realpath "${2:-$(dirname "$RLHF")/examples/score}")
[ -x "$SCORE" ] || { echo "$SCORE missing: cargo build --example score (the binary's profile)" >&2; exit 2; }
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
CHECK="$HERE/check_hf_merge.py"
W=${WORK:-$(mktemp -d)}
mkdir -p "$W"
echo "work folder: $W"

"$PY" "$CHECK" fixtures "$W" > "$W/fixtures.log" 2>&1 || { cat "$W/fixtures.log"; exit 1; }

train() { # algo, data file, output folder
    cat > "$W/$1.toml" <<EOF
[model]
path = "$W/base"
quantize = "nf4"

[data]
train = "$W/$2"
max_length = 32
max_prompt_length = 16

[train]
output_dir = "$W/$3"
batch_size = 8
max_steps = 3
learning_rate = 0.05
lr_scheduler = "constant"
save_steps = 100
logging_steps = 1

[lora]
r = 8
alpha = 16.0
EOF
    "$RLHF" "$1" --config "$W/$1.toml" > "$W/$1.log" 2>&1 || { cat "$W/$1.log"; exit 1; }
}
train sft sft.jsonl sft
train rm pairs.jsonl rm

merge() { # adapter folder, out name, dtype
    "$RLHF" merge --model "$W/base" --adapter "$W/$1" --out "$W/$2" --dtype "$3" > /dev/null
}
merge sft/policy merged-sft f32
merge sft/policy merged-sft-bf16 bf16
merge peft-causal merged-peft f32
merge peft-causal merged-peft-bf16 bf16
merge rm/reward merged-rm f32
merge peft-reward merged-peft-reward f32

for a in rm/reward peft-reward; do
    n=${a//\//-}
    "$SCORE" "$W/base" "$W/$a" "$W/rows.json" > "$W/scores-$n-f32.json"
    "$SCORE" "$W/base" "$W/$a" "$W/rows.json" --nf4 > "$W/scores-$n-nf4.json"
done

status=0
run() { "$PY" "$CHECK" "$@" 2>/dev/null | tee -a "$W/checks.log" || status=1; }
: > "$W/checks.log"
run causal --base "$W/base" --adapter "$W/sft/policy" --merged "$W/merged-sft" --merged-bf16 "$W/merged-sft-bf16"
run causal --base "$W/base" --adapter "$W/peft-causal" --merged "$W/merged-peft" --merged-bf16 "$W/merged-peft-bf16"
run reward --base "$W/base" --adapter "$W/rm/reward" --merged "$W/merged-rm" \
    --rlhf-scores "f32=$W/scores-rm-reward-f32.json" --rlhf-scores "nf4=$W/scores-rm-reward-nf4.json"
run reward --base "$W/base" --adapter "$W/peft-reward" --merged "$W/merged-peft-reward" \
    --rlhf-scores "f32=$W/scores-peft-reward-f32.json" --rlhf-scores "nf4=$W/scores-peft-reward-nf4.json"

echo
echo "summary: $(grep -c '^ok' "$W/checks.log") passed, $(grep -c '^FAIL' "$W/checks.log") failed"
exit $status
