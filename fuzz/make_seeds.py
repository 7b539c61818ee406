#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets into corpus/<target>/seed-*: copies of
the shipped configs and model configs, the quantization fixture, and small files of each format
written here (a tiny Llama GGUF with a tokenizer and chat template, a safetensors file in the
three float types, dataset rows of every kind). Run from this folder: python3 make_seeds.py"""
import glob, json, os, shutil, struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(os.path.join(d, "seed-" + name), mode) as f:
        f.write(data)


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def tiny_llama_gguf():
    vocab = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 107)] + ["ab", "cd"]
    kv = [
        ("general.architecture", 8, gguf_str("llama")),
        ("general.alignment", 4, struct.pack("<I", 32)),
        ("llama.context_length", 4, struct.pack("<I", 64)),
        ("llama.embedding_length", 4, struct.pack("<I", 8)),
        ("llama.block_count", 4, struct.pack("<I", 1)),
        ("llama.feed_forward_length", 4, struct.pack("<I", 16)),
        ("llama.attention.head_count", 4, struct.pack("<I", 2)),
        ("llama.attention.head_count_kv", 4, struct.pack("<I", 1)),
        ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5)),
        ("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        ("tokenizer.ggml.model", 8, gguf_str("gpt2")),
        ("tokenizer.ggml.tokens", 9,
         struct.pack("<IQ", 8, len(vocab)) + b"".join(gguf_str(t) for t in vocab)),
        ("tokenizer.ggml.merges", 9,
         struct.pack("<IQ", 8, 2) + gguf_str("a b") + gguf_str("c d")),
        ("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 1)),
        ("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 2)),
        ("tokenizer.chat_template", 8, gguf_str(
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")),
    ]
    hidden, n_vocab = 8, len(vocab)
    tensors = [
        ("token_embd.weight", [hidden, n_vocab], 0,
         struct.pack(f"<{hidden * n_vocab}f", *[((i * 7) % 13 - 6) / 10 for i in range(hidden * n_vocab)])),
        ("output_norm.weight", [hidden], 1, struct.pack(f"<{hidden}e", *[1.0] * hidden)),
        # one Q8_0 block: f16 scale + 32 int8
        ("blk.0.ffn_gate.weight", [32, 1], 8, struct.pack("<e", 0.05) + bytes(range(32))),
    ]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, ty, v in kv:
        head += gguf_str(k) + struct.pack("<I", ty) + v
    offset, infos, data = 0, b"", b""
    for name, ne, ty, raw in tensors:
        infos += gguf_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        infos += struct.pack("<IQ", ty, offset)
        pad = (-len(raw)) % 32
        data += raw + bytes(pad)
        offset += len(raw) + pad
    blob = head + infos
    blob += bytes((-len(blob)) % 32)
    return blob + data


def tiny_safetensors():
    tensors = {
        "a.f32": ("F32", [2, 2], struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)),
        "b.f16": ("F16", [3], struct.pack("<3e", 1.0, -0.25, 2.0)),
        "c.bf16": ("BF16", [2], bytes([0x80, 0x3F, 0x00, 0xC0])),
    }
    header, offset, data = {}, 0, b""
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    out("gguf", "tiny-llama.gguf", tiny_llama_gguf())
    shutil.copy(os.path.join(ROOT, "tests/fixtures/gguf_quants/quants.gguf"),
                os.path.join(HERE, "corpus/gguf/seed-quants.gguf"))
    for p in sorted(glob.glob(os.path.join(ROOT, "configs/models/*.json"))
                    + glob.glob(os.path.join(ROOT, "tests/data/calibration/*b.json"))
                    + glob.glob(os.path.join(ROOT, "tests/data/calibration/tiny.json"))):
        out("model_config", os.path.basename(p), open(p).read())
    out("safetensors", "tiny.safetensors", tiny_safetensors())
    for p in sorted(glob.glob(os.path.join(ROOT, "configs/*.toml"))):
        out("run_config", os.path.basename(p), open(p).read())
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"prompt": "Say yes.", "completion": "yes", "label": True},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1"},
                      {"role": "assistant", "content": "2"}]},
        {"prompt": "What is 3*3?", "answer": "9"},
        {"text": "plain text row"},
    ]
    out("dataset", "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out("dataset", "rows.json", json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
