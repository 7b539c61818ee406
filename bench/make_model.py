#!/usr/bin/env python3
"""Write a seeded random Llama-architecture checkpoint in Hugging Face layout, plus matching data.

Both systems of the peer benchmark read the folder this writes (trl_baseline.py for TRL,
`rlhf bench` for us), so they measure exactly the same workload. The weights are random: use them
for speed and memory, never for quality.

    python3 bench/make_model.py --size 0.5b --out DIR [--prompt-len 128 --completion-len 128 --rows 512]

Writes config.json, model.safetensors (bf16; sharded above 4 GB, with an index), tokenizer.json /
tokenizer_config.json (a word-level tokenizer over the words w0..wN, one token per word), and
dpo.jsonl (prompt / chosen / rejected) and grpo.jsonl (prompt / answer) whose texts have exactly
--prompt-len and --completion-len words. The same --size, lengths and --seed give the same folder.
Needs torch, transformers and tokenizers.
"""
import argparse
import json
import os
import random

# name: hidden, layers, heads, kv_heads, intermediate, vocab
SIZES = {
    "tiny": (256, 4, 8, 4, 688, 4096),
    "0.5b": (896, 24, 14, 2, 4864, 32000),
    "1.5b": (1536, 28, 12, 2, 8960, 32000),
    "8b": (4096, 32, 32, 8, 14336, 128256),
    "20b": (6144, 48, 48, 8, 16384, 65536),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def write_model(size, out, max_positions, seed, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16")
    # Built directly in bf16: an f32 20b model would not fit one 80 GB card.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    # A small init keeps activations in range over long generations.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out, max_shard_size="4GB", safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def write_tokenizer(vocab, out):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = None
    fast.save_pretrained(out)


def write_data(vocab, out, rows, prompt_len, completion_len, seed):
    rng = random.Random(seed)

    def text(k):
        return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(k))

    with open(os.path.join(out, "dpo.jsonl"), "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": text(prompt_len), "chosen": text(completion_len),
                                "rejected": text(completion_len)}) + "\n")
    # The GRPO reward counts the answer word in each completion (trl_baseline.py, rlhf bench).
    with open(os.path.join(out, "grpo.jsonl"), "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": text(prompt_len), "answer": "w7"}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-len", type=int, default=128, help="words (= tokens) per prompt")
    ap.add_argument("--completion-len", type=int, default=128,
                    help="words per DPO completion (chosen and rejected)")
    ap.add_argument("--rows", type=int, default=512, help="rows of dpo.jsonl and grpo.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="where the weights are initialised")
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    vocab = SIZES[a.size][5]
    max_positions = max(4096, 2 * (a.prompt_len + a.completion_len))
    n = write_model(a.size, a.out, max_positions, a.seed, a.device)
    write_tokenizer(vocab, a.out)
    write_data(vocab, a.out, a.rows, a.prompt_len, a.completion_len, a.seed)
    print(json.dumps({"size": a.size, "params": n, "out": a.out, "prompt_len": a.prompt_len,
                      "completion_len": a.completion_len, "rows": a.rows}))


if __name__ == "__main__":
    main()
