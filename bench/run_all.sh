#!/usr/bin/env bash
# Reproduces the rows of BENCHMARKS.md on a CUDA machine: TRL (bench/trl_baseline.py) and rlhf on
# the same make_model.py checkpoint, one after the other in the same call, on the same card.
#
#   bash bench/run_all.sh RLHF MODELS [OUT]
#
#   RLHF    the rlhf binary, built with `cargo build --release --features cuda`
#   MODELS  a folder for the make_model.py checkpoints (written on first use, reused after;
#           tiny .. 8b need ~20 GB of disk, a 20b one ~40 GB more; before an 8b or 20b one is
#           written, older ones are removed until its disk has room)
#   OUT     where results go (default: $OUT, else ./bench-out): results.jsonl gets one JSON line
#           per run, tagged with its BENCHMARKS.md row ("row"), logs/ the full output of each run
#
# Environment:
#   ROWS     row names or groups to run, space-separated (default: every row). Groups: speed,
#            decode, memory, attention, alloc, planner (its runs with `rlhf bench`, and cal-0.5b-ppo); rows: the
#            names in each section below (e.g. ROWS="dpo-0.5b grpo-0.5b").
#   WHEELS   a folder of wheels (TRL and the packages the image lacks, bench/README.md) to
#            install into a private site-packages first; without it they must be importable
#   CAP_GIB  the card the memory rows emulate (default 23.6: a 24 GB card, bench/cap.py)
#   DTYPE    model.dtype of the config-driven runs (default f32)
#   CACHE    plan.cache of the 20b config-driven memory rows (default: the config's, "budget")
#   DECODE_CHECK  the decode_check example (`cargo build --release --features cuda --example
#            decode_check`), for the decode rows; they are skipped without it
#   ATTENTION_CHECK  the attention_check example, for the attention row (skipped without it)
#
# Each row's commands are exactly the ones BENCHMARKS.md prints beside it. Where one call is
# limited in time, run a few rows per call (ROWS); checkpoints already in MODELS are reused.
set -euo pipefail

if [ $# -lt 2 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
RLHF=$(realpath "$1")
MODELS=$(realpath -m "$2")
RESULTS=$(realpath -m "${3:-${OUT:-bench-out}}")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ROWS=${ROWS:-}
CAP_GIB=${CAP_GIB:-23.6}
DTYPE=${DTYPE:-f32}
mkdir -p "$MODELS" "$RESULTS/logs"
JSONL="$RESULTS/results.jsonl"
export HF_HUB_OFFLINE=1

if [ -n "${WHEELS:-}" ]; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl
  # A trimmed bitsandbytes (its wheel without the ROCm and old CUDA libraries) may come zipped.
  for z in "$WHEELS"/*.zip; do [ -e "$z" ] && python3 -m zipfile -e "$z" "$SITE"; done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$RLHF" --version 2>/dev/null || true
  python3 -c 'import torch, trl, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", b.__version__)' 2>/dev/null || echo "TRL stack not importable"
} | tee "$RESULTS/environment.txt"

# want ROW GROUP: whether ROWS asks for this row.
want() {
  [ -z "$ROWS" ] && return 0
  local w
  for w in $ROWS; do [ "$w" = "$1" ] || [ "$w" = "$2" ] && return 0; done
  return 1
}

# room GIB KEEP: deletes MODELS' other checkpoints, oldest first, until GIB GiB are free on its
# disk (a 20b checkpoint takes ~40 GB: two of them do not fit a 64 GB disk).
room() {
  local need=$1 keep=$2 old
  while [ "$(df --output=avail -B1G "$MODELS" | tail -1)" -lt "$need" ]; do
    old=$(ls -1tr "$MODELS" | grep -vxF "$keep" | head -1)
    [ -n "$old" ] || return 0
    echo "== removing $MODELS/$old to make room" >&2
    rm -rf "${MODELS:?}/$old"
  done
}

# model NAME SIZE [make_model.py flags]: the checkpoint folder, written if missing.
model() {
  local dir="$MODELS/$1" size=$2
  shift 2
  if [ ! -f "$dir/dpo.jsonl" ]; then
    case $size in 20b) room 45 "$1" ;; 8b) room 20 "$1" ;; esac
    echo "== make_model.py --size $size $* --out $dir" >&2
    python3 "$HERE/make_model.py" --size "$size" "$@" --out "$dir" >&2 ||
      { echo "make_model.py failed for $dir" >&2; rm -f "$dir/dpo.jsonl"; return 1; }
  fi
  echo "$dir"
}

# record ROW SYSTEM LOG: appends the last JSON line of LOG, tagged, to results.jsonl.
record() {
  local line
  line=$(grep '^{' "$3" | tail -1 || true)
  [ -n "$line" ] || line='{"error": "no JSON line: see the log"}'
  python3 -c 'import json, sys
d = json.loads(sys.argv[3]); d.setdefault("system", sys.argv[2])
print(json.dumps({"row": sys.argv[1], **d}))' "$1" "$2" "$line" | tee -a "$JSONL"
}

# trl ROW FLAGS...: the TRL side of a row.
trl() {
  local row=$1 log="$RESULTS/logs/$1.trl.log"
  shift
  echo "== $row: python3 bench/trl_baseline.py $*" | tee "$log"
  python3 "$HERE/trl_baseline.py" --out "" "$@" >>"$log" 2>&1 || echo "trl exit $?" >>"$log"
  record "$row" trl "$log"
}

# ours ROW FLAGS...: the rlhf side of a row (`rlhf bench`). With TRACE_MEM=1 the log also gets
# the allocator at each labelled high point (the memory and planner rows; it adds host work, so
# the speed rows run without it).
ours() {
  local row=$1 log="$RESULTS/logs/$1.rlhf.log"
  shift
  echo "== $row: rlhf bench --device cuda $*" | tee "$log"
  RLHF_TRACE_MEM=${TRACE_MEM:-0} "$RLHF" bench --device cuda "$@" >>"$log" 2>&1 ||
    echo "rlhf exit $?" >>"$log"
  record "$row" rlhf "$log"
}

# config ROW COMMAND TEMPLATE OVERRIDES...: `rlhf COMMAND --config` on a copy of TEMPLATE with
# section.key=value overrides (paths, steps) and the flags in FLAGS (e.g. "--force --resume");
# records the exit code, the largest labelled in-use and reserved readings, the process's largest
# nvidia-smi reading, the plan's peak and the run's last error line.
config() {
  local row=$1 cmd=$2 template=$3 log="$RESULTS/logs/$1.rlhf.log" cfg="$RESULTS/$1.toml"
  shift 3
  python3 - "$template" "$cfg" "$@" <<'PY'
import re, sys
src, dst, *sets = sys.argv[1:]
want = {}
for s in sets:
    key, value = s.split("=", 1)
    section, name = key.rsplit(".", 1)
    want.setdefault(section, {})[name] = value
out, section, done = [], None, set()
def flush():
    for name, value in want.get(section, {}).items():
        if (section, name) not in done:
            out.append(f"{name} = {value}")
            done.add((section, name))
for line in open(src).read().splitlines():
    m = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
    if m:
        flush()
        section = m.group(1).strip()
    else:
        k = re.match(r"\s*([A-Za-z0-9_]+)\s*=", line)
        if k and k.group(1) in want.get(section, {}):
            line = f"{k.group(1)} = {want[section][k.group(1)]}"
            done.add((section, k.group(1)))
    out.append(line)
flush()
for sec, names in want.items():
    for name, value in names.items():
        if (sec, name) not in done:
            sys.exit(f"{src}: no section [{sec}] for {name}")
open(dst, "w").write("\n".join(out) + "\n")
PY
  echo "== $row: rlhf $cmd --config $cfg ${FLAGS:-}" | tee "$log"
  local plan
  plan=$("$RLHF" plan --algo "$cmd" --config "$cfg" --json 2>/dev/null || true)
  local smi="$RESULTS/logs/$row.smi"
  # shellcheck disable=SC2086
  RLHF_TRACE_MEM=1 "$RLHF" "$cmd" --config "$cfg" ${FLAGS:-} >>"$log" 2>&1 &
  local pid=$! rc=0
  (while kill -0 "$pid" 2>/dev/null; do
     nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null
     sleep 0.2
   done) >"$smi" &
  local poll=$!
  wait "$pid" || rc=$?
  wait "$poll" || true
  python3 - "$row" "$cmd" "$cfg" "$rc" "$log" "$smi" "$pid" "$plan" <<'PY' | tee -a "$JSONL"
import json, re, sys
row, cmd, cfg, rc, log, smi, pid, plan = sys.argv[1:]
in_use = reserved = 0.0
for line in open(log, errors="replace"):
    m = re.match(r"mem .*: ([0-9.]+) MiB in use, ([0-9.]+) MiB reserved", line)
    if m:
        in_use, reserved = max(in_use, float(m[1])), max(reserved, float(m[2]))
card = 0.0
for line in open(smi):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[0] == pid and parts[1].isdigit():
        card = max(card, float(parts[1]))
errors = [l.strip() for l in open(log, errors="replace") if l.startswith(("error:", "panicked", "thread "))]
res = {"row": row, "system": "rlhf", "command": f"rlhf {cmd} --config {cfg}", "exit": int(rc),
       "error": errors[-1] if errors else None,
       "peak_alloc_gib": round(in_use / 1024, 3), "peak_reserved_gib": round(reserved / 1024, 3),
       "peak_card_gib": round(card / 1024, 3) if card else None}
try:
    p = json.loads(plan)
    res["planned_peak_gib"] = round(p["peak_bytes"] / 2**30, 3)
    res["budget_gib"] = round(p["budget_bytes"] / 2**30, 3)
    res["plan_fits"] = p.get("fits")
except (ValueError, KeyError, TypeError):
    res["planned_peak_gib"] = None
print(json.dumps(res))
PY
}

# capped COMMAND...: runs COMMAND while bench/cap.py holds all but CAP_GIB of the card.
capped() {
  local out="$RESULTS/logs/cap.log"
  python3 "$HERE/cap.py" "$CAP_GIB" >"$out" 2>&1 &
  local holder=$!
  until grep -q capped "$out" 2>/dev/null; do
    kill -0 "$holder" 2>/dev/null || { cat "$out"; return 1; }
    sleep 1
  done
  cat "$out"
  "$@" || true
  kill "$holder"
  wait "$holder" 2>/dev/null || true
}

# --- speed: TRL and rlhf side by side --------------------------------------------------------
DPO05="--algo dpo --batch 8 --max-length 256 --steps 5 --warmup 2"
GRPO05="--algo grpo --prompts 2 --group 8 --completion-len 128 --steps 3 --warmup 1"
DPO8="--algo dpo --batch 4 --max-length 512 --steps 4 --warmup 1"
DPO20="--algo dpo --batch 2 --max-length 1024 --steps 3 --warmup 1"
GRPO20="--algo grpo --prompts 1 --group 8 --completion-len 512 --steps 2 --warmup 1"
if want dpo-0.5b speed; then
  m=$(model 0.5b 0.5b)
  trl dpo-0.5b --model "$m" $DPO05
  ours dpo-0.5b --model "$m" $DPO05
fi
if want grpo-0.5b speed; then
  m=$(model 0.5b 0.5b)
  trl grpo-0.5b --model "$m" $GRPO05
  ours grpo-0.5b --model "$m" $GRPO05
fi
if want dpo-8b speed; then
  m=$(model 8b 8b --rows 64)
  trl dpo-8b --model "$m" $DPO8
  ours dpo-8b --model "$m" $DPO8
fi
if want dpo-20b speed; then
  m=$(model 20b-1024 20b --prompt-len 512 --completion-len 512 --rows 64)
  trl dpo-20b --model "$m" $DPO20
  ours dpo-20b --model "$m" $DPO20
fi
if want dpo-20b-256 speed; then
  m=$(model 20b 20b --rows 64)
  trl dpo-20b-256 --model "$m" $DPO20
  ours dpo-20b-256 --model "$m" $DPO20
fi
if want grpo-20b speed; then
  m=$(model 20b 20b --rows 64)
  trl grpo-20b --model "$m" $GRPO20
  ours grpo-20b --model "$m" $GRPO20
fi

# --- decode (rlhf only): the fused sampling step at 16 rows, checked against the ordinary
# forward, then timed with each launch class left out in turn ("full" is the whole step) -------
decode() {
  local row=$1 log="$RESULTS/logs/$1.rlhf.log"
  shift
  if [ -z "${DECODE_CHECK:-}" ]; then
    echo "$row: set DECODE_CHECK to run it" >&2
    return 0
  fi
  echo "== $row: decode_check $*" | tee "$log.check"
  "$DECODE_CHECK" "$@" >>"$log.check" 2>&1 || echo "decode_check exit $?" >>"$log.check"
  record "$row" rlhf "$log.check"
  echo "== $row: ABLATE=1 decode_check $*" | tee "$log"
  ABLATE=1 "$DECODE_CHECK" "$@" >>"$log" 2>&1 || echo "decode_check exit $?" >>"$log"
  record "$row" rlhf "$log"
}
if want decode-0.5b decode; then
  m=$(model 0.5b 0.5b)
  decode decode-0.5b "$m" 16 64 64
fi
if want decode-8b decode; then
  m=$(model 8b 8b --rows 64)
  decode decode-8b "$m" 16 64 16
fi

# --- memory on a 24 GB card: rlhf under bench/cap.py, TRL's peaks uncapped --------------------
TRACE_MEM=1
if want mem-dpo-20b-trl memory; then
  m=$(model 20b-1024 20b --prompt-len 512 --completion-len 512 --rows 64)
  trl mem-dpo-20b-trl --model "$m" $DPO20
  capped ours mem-dpo-20b-trl --model "$m" $DPO20
fi
if want mem-grpo-20b-trl memory; then
  m=$(model 20b-1024 20b --prompt-len 512 --completion-len 512 --rows 64)
  trl mem-grpo-20b-trl --model "$m" $GRPO20
  capped ours mem-grpo-20b-trl --model "$m" $GRPO20
fi
# The shipped 24 GB configs' shapes, on the random checkpoint, 3 optimizer steps each.
run="train.max_steps=3 train.gradient_accumulation_steps=1 train.save_steps=3 train.logging_steps=1${CACHE:+ plan.cache=\"$CACHE\"}"
if want mem-dpo-20b memory; then
  m=$(model 20b-1024 20b --prompt-len 512 --completion-len 512 --rows 64)
  # shellcheck disable=SC2086
  capped config mem-dpo-20b dpo "$REPO/configs/20b-dpo-24gb.toml" \
    model.path="\"$m\"" model.dtype="\"$DTYPE\"" data.train="\"$m/dpo.jsonl\"" data.chat_template=false \
    train.output_dir="\"$RESULTS/runs/dpo-20b\"" $run
fi
if want mem-grpo-20b memory; then
  m=$(model 20b-1024 20b --prompt-len 512 --completion-len 512 --rows 64)
  # shellcheck disable=SC2086
  capped config mem-grpo-20b grpo "$REPO/configs/20b-grpo-24gb.toml" \
    model.path="\"$m\"" model.dtype="\"$DTYPE\"" data.train="\"$m/grpo.jsonl\"" data.chat_template=false \
    train.output_dir="\"$RESULTS/runs/grpo-20b\"" $run
fi
if want mem-rm-20b memory || want mem-ppo-20b memory; then
  m=$(model 20b-1024 20b --prompt-len 512 --completion-len 512 --rows 64)
  if [ -f "$REPO/configs/20b-rm-24gb.toml" ]; then
    capped config mem-rm-20b rm "$REPO/configs/20b-rm-24gb.toml" \
      model.path="\"$m\"" model.dtype="\"$DTYPE\"" data.train="\"$m/dpo.jsonl\"" data.chat_template=false \
      train.output_dir="\"$RESULTS/runs/rm-20b\"" $run
  else
    echo "mem-rm-20b: configs/20b-rm-24gb.toml not in this checkout" >&2
  fi
  if want mem-ppo-20b memory; then
    capped config mem-ppo-20b ppo "$REPO/configs/20b-ppo-24gb.toml" \
      model.path="\"$m\"" model.dtype="\"$DTYPE\"" data.train="\"$m/grpo.jsonl\"" data.chat_template=false \
      train.output_dir="\"$RESULTS/runs/ppo-20b\"" \
      ppo.reward_adapter="\"$RESULTS/runs/rm-20b/reward\"" $run
  fi
fi

# --- the planner's verdict at the edge of a 24 GB card, under the cap: DPO 20b, 2 pairs of rows
# longer than the shipped config's, budget 23.6 GiB (the cap). 2,176-token rows plan "fits" with
# 2.3% headroom (2 steps, a checkpoint each); 2,432-token rows plan "does not fit" by 5.4%, forced
# from the first run's checkpoint (it must fail with exit 4 and one line); then the first run
# resumes from its checkpoint and takes step 3.
if want edge-20b memory; then
  m=$(model 20b-long 20b --prompt-len 1024 --completion-len 1536 --rows 16)
  edge="model.path=\"$m\" model.dtype=\"$DTYPE\" data.train=\"$m/dpo.jsonl\" data.chat_template=false
    data.max_prompt_length=1024 plan.budget_gib=23.6 train.output_dir=\"$RESULTS/runs/edge-20b\"
    train.gradient_accumulation_steps=1 train.save_steps=1 train.logging_steps=1"
  # shellcheck disable=SC2086
  capped config edge-20b-fits dpo "$REPO/configs/20b-dpo-24gb.toml" $edge \
    data.max_length=2176 train.max_steps=2
  # shellcheck disable=SC2086
  FLAGS="--force --resume" capped config edge-20b-over dpo "$REPO/configs/20b-dpo-24gb.toml" $edge \
    data.max_length=2432 train.max_steps=3
  ls "$RESULTS/runs/edge-20b" >"$RESULTS/logs/edge-20b.ls" 2>&1 || true
  # shellcheck disable=SC2086
  FLAGS="--resume" capped config edge-20b-resume dpo "$REPO/configs/20b-dpo-24gb.toml" $edge \
    data.max_length=2176 train.max_steps=3
fi

# --- PPO with a separate 8b reward model (both NF4) under the cap: the reward model is the 8b
# checkpoint with a fresh one-label score head (bench/make_reward_model.py).
if want ppo-rm-8b memory; then
  m=$(model 8b-ppo 8b --prompt-len 512 --completion-len 512 --rows 64)
  rm8="$MODELS/8b-ppo-reward"
  if [ ! -f "$rm8/config.json" ]; then
    python3 "$HERE/make_reward_model.py" --base "$m" --out "$rm8" >&2 ||
      { echo "make_reward_model.py failed" >&2; rm -rf "$rm8"; }
  fi
  capped config ppo-rm-8b ppo "$HERE/configs/ppo-8b-rm.toml" model.path="\"$m\"" \
    data.train="\"$m/grpo.jsonl\"" ppo.reward_model_path="\"$rm8\"" \
    train.output_dir="\"$RESULTS/runs/ppo-rm-8b\""
fi

# --- long rows under the cap: DPO 8b with one pair of 16,384-token rows (the shipped
# configs/8b-dpo-16k-24gb.toml on the random checkpoint, 3 optimizer steps).
if want dpo-16k-8b memory; then
  m=$(model 8b-16k 8b --prompt-len 8192 --completion-len 8192 --rows 8)
  capped config dpo-16k-8b dpo "$REPO/configs/8b-dpo-16k-24gb.toml" model.path="\"$m\"" \
    data.train="\"$m/dpo.jsonl\"" data.chat_template=false plan.budget_gib=23.6 \
    train.output_dir="\"$RESULTS/runs/dpo-16k-8b\"" train.max_steps=3 \
    train.gradient_accumulation_steps=1 train.save_steps=3 train.logging_steps=1
fi

# --- attention: the CUDA attention's regimes against burn's ops and autodiff, and its memory
# at 2K-16K tokens (ATTENTION_CHECK: `cargo build --release --features cuda --example
# attention_check`).
if want attention attention && [ -n "${ATTENTION_CHECK:-}" ]; then
  "$ATTENTION_CHECK" 2>&1 | tee "$RESULTS/logs/attention.log" || echo "attention_check exit $?" >>"$RESULTS/logs/attention.log"
fi

# --- allocator: the DPO 8b and 20b speed rows' rlhf side under each split-pool setting and with
# a page per tensor (README's CUBECL_* variables); each JSON line carries the step time, the
# allocator's in-use and held peaks and the process's card. TRL's side: the speed rows.
if want alloc-8b alloc || want alloc-20b alloc; then
  for setting in default CUBECL_SPLIT_MAX_RATIO=4 CUBECL_SPLIT_MIN_REST=1048576 \
    CUBECL_SPLIT_MIN=0 CUBECL_CUDA_MEMORY=exclusive; do
    name=${setting#CUBECL_}
    name=$(echo "${name%%=*}-${setting#*=}" | tr 'A-Z_' 'a-z-')
    assign=$setting
    [ "$setting" = default ] && name=default && assign=
    if want alloc-8b alloc; then
      m=$(model 8b 8b --rows 64)
      # shellcheck disable=SC2086
      env $assign "$RLHF" bench --device cuda --model "$m" $DPO8 \
        >"$RESULTS/logs/alloc-8b-$name.log" 2>&1 || echo "rlhf exit $?" >>"$RESULTS/logs/alloc-8b-$name.log"
      record "alloc-8b-$name" rlhf "$RESULTS/logs/alloc-8b-$name.log"
    fi
    if want alloc-20b alloc; then
      m=$(model 20b 20b --rows 64)
      # shellcheck disable=SC2086
      env $assign "$RLHF" bench --device cuda --model "$m" $DPO20 \
        >"$RESULTS/logs/alloc-20b-$name.log" 2>&1 || echo "rlhf exit $?" >>"$RESULTS/logs/alloc-20b-$name.log"
      record "alloc-20b-$name" rlhf "$RESULTS/logs/alloc-20b-$name.log"
    fi
  done
fi

# --- planner: the calibration runs of tests/data/calibration/measured.json -------------------
if want planner planner; then
  mt=$(model tiny tiny)
  m05=$(model 0.5b 0.5b)
  m05l=$(model 0.5b-512 0.5b --prompt-len 256 --completion-len 256 --rows 64)
  m15=$(model 1.5b 1.5b)
  m8=$(model 8b 8b --rows 64)
  # The allocator's cache held to the plan (`--cache-plan`), so the card reading tests the
  # plan's card term too.
  ours "cal-tiny-dpo-8x256" --model "$mt" --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1 --cache-plan
  ours "cal-tiny-grpo-2x8x128" --model "$mt" --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1 --cache-plan
  ours "cal-0.5b-dpo-8x256" --model "$m05" --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1 --cache-plan
  ours "cal-0.5b-dpo-4x512" --model "$m05l" --algo dpo --batch 4 --max-length 512 --steps 2 --warmup 1 --cache-plan
  ours "cal-0.5b-grpo-2x8x128" --model "$m05" --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1 --cache-plan
  ours "cal-0.5b-grpo-4x8x256" --model "$m05" --algo grpo --prompts 4 --group 8 --completion-len 256 --steps 1 --warmup 1 --cache-plan
  ours "cal-1.5b-dpo-8x256" --model "$m15" --algo dpo --batch 8 --max-length 256 --steps 2 --warmup 1 --cache-plan
  ours "cal-1.5b-grpo-2x8x128" --model "$m15" --algo grpo --prompts 2 --group 8 --completion-len 128 --steps 2 --warmup 1 --cache-plan
  ours "cal-8b-dpo-4x512" --model "$m8" --algo dpo --batch 4 --max-length 512 --steps 2 --warmup 1 --cache-plan
  ours "cal-8b-grpo-1x8x64" --model "$m8" --algo grpo --prompts 1 --group 8 --completion-len 64 --steps 1 --warmup 1 --cache-plan
fi
if want cal-0.5b-ppo planner; then
  m05=$(model 0.5b 0.5b)
  # PPO: a reward adapter from one `rlhf rm` step, then the calibrated PPO shapes.
  config "cal-rm-0.5b" rm "$HERE/configs/rm-0.5b.toml" model.path="\"$m05\"" \
    data.train="\"$m05/dpo.jsonl\"" train.output_dir="\"$RESULTS/runs/rm-0.5b\""
  config "cal-0.5b-ppo" ppo "$REPO/tests/data/calibration/ppo-0.5b.toml" plan.cache='"plan"' \
    model.path="\"$m05\"" data.train="\"$m05/grpo.jsonl\"" \
    train.output_dir="\"$RESULTS/runs/ppo-0.5b\"" \
    ppo.reward_adapter="\"$RESULTS/runs/rm-0.5b/reward\""
fi
echo "results: $JSONL"
