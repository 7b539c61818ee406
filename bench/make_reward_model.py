#!/usr/bin/env python3
"""Write a Hugging Face reward model (`LlamaForSequenceClassification`, one label) on a
make_model.py checkpoint: the base's weights with a freshly initialised `score` head, as a reward
model fine-tuned from that base would be laid out. For `ppo.reward_model_path` runs.

    python3 bench/make_reward_model.py --base DIR --out DIR [--seed 0]

Writes config.json, model.safetensors (bf16, sharded like the base) and the base's tokenizer files.
Needs torch and transformers.
"""
import argparse
import shutil
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForSequenceClassification.from_pretrained(
        a.base, num_labels=1, dtype=torch.bfloat16, device_map=device)
    m.config.pad_token_id = m.config.pad_token_id if m.config.pad_token_id is not None else 0
    m.save_pretrained(a.out, safe_serialization=True, max_shard_size="4GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(a.base) / name).exists():
            shutil.copy(Path(a.base) / name, Path(a.out) / name)
    print(f"reward model: {a.out} ({sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params)")


if __name__ == "__main__":
    main()
