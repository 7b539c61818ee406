#!/usr/bin/env python3
"""Checks a GGUF file written by `rlhf merge --gguf` with llama.cpp's own Python reader.

    pip install gguf   # llama.cpp's gguf-py
    python3 scripts/check_gguf.py OUT/model-q8_0.gguf [--hf OUT]

Opens the file with `gguf.GGUFReader`, lists its tensors (type, shape) and the metadata a
llama.cpp `llama` model needs, and checks the data offsets' alignment and the vocabulary size.
With `--hf` (the merged folder written with `--dtype f32`), every weight is rebuilt from the
folder's `model.safetensors` the way llama.cpp's `convert_hf_to_gguf.py` does (its Q/K row
permutation, its f16 cast, gguf-py's Q8_0 quantizer) and compared byte for byte, and each Q8_0
tensor is dequantized with `gguf.quants.dequantize` and compared with the f32 weights.
Exits 1 on any mismatch.
"""

import argparse
import json
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

REQUIRED = [
    "general.architecture",
    "general.file_type",
    "general.alignment",
    "llama.context_length",
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.dimension_count",
    "llama.vocab_size",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
]

HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(name):
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    blk, layer, module, param = name.split(".")
    assert blk == "blk", name
    return f"model.layers.{layer}.{HF_MODULES[module]}.{param}"


def permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: merge with --dtype f32 for --hf ({info['dtype']})"
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return out


def value(field):
    v = field.contents()
    if isinstance(v, list) and len(v) > 4:
        return f"[{len(v)} items: {', '.join(repr(x) for x in v[:3])}, ...]"
    if isinstance(v, str) and len(v) > 60:
        return repr(v[:57] + "...")
    return repr(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--hf", help="the merged HF folder (written with --dtype f32)")
    args = ap.parse_args()
    r = GGUFReader(args.gguf)
    failures = []
    print(f"{args.gguf}: {len(r.tensors)} tensors, {len(r.fields)} fields, alignment {r.alignment}")
    for key in REQUIRED:
        if key in r.fields:
            print(f"  {key} = {value(r.fields[key])}")
        else:
            failures.append(f"missing metadata {key}")
    for key in ["tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.chat_template"]:
        if key in r.fields:
            print(f"  {key} = {value(r.fields[key])}")
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if t.data_offset % r.alignment:
            failures.append(f"{t.name}: data offset {t.data_offset} not aligned")
    for t in r.tensors[:4] + r.tensors[-3:]:
        print(f"  tensor {t.name:28} {t.tensor_type.name:5} ne={list(map(int, t.shape))}")
    print(f"  tensor types: {counts}")
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    if int(embd.shape[1]) != n_vocab:
        failures.append(f"token_embd has {int(embd.shape[1])} rows for {n_vocab} tokens")

    if args.hf:
        hf = read_safetensors(f"{args.hf}/model.safetensors")
        n_head = int(r.fields["llama.attention.head_count"].contents())
        n_kv = int(r.fields["llama.attention.head_count_kv"].contents())
        worst = {}
        for t in r.tensors:
            if t.name == "rope_freqs.weight":
                continue
            w = hf[hf_name(t.name)].astype(np.float32)
            if ".attn_q." in t.name:
                w = permute(w, n_head)
            elif ".attn_k." in t.name:
                w = permute(w, n_kv)
            if t.tensor_type == T.F32:
                same = np.array_equal(np.asarray(t.data).reshape(w.shape), w)
            elif t.tensor_type == T.F16:
                same = np.array_equal(np.asarray(t.data).reshape(w.shape), w.astype(np.float16))
            elif t.tensor_type == T.Q8_0:
                ref = quantize(w, T.Q8_0)
                same = np.array_equal(np.asarray(t.data).reshape(ref.shape), ref)
                deq = dequantize(np.asarray(t.data), T.Q8_0).reshape(w.shape)
                # Each value within half a step of its block's scale, max|x|/127 (plus the f16
                # rounding of the scale).
                blocks = w.reshape(-1, 32)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127
                excess = np.abs(deq.reshape(-1, 32) - blocks) - step * (0.5 + 127 / 2048)
                if (excess > 0).any():
                    failures.append(f"{t.name}: dequantized values off by more than half a step")
                worst[t.name] = float(np.abs(deq - w).max())
            else:
                failures.append(f"{t.name}: unexpected type {t.tensor_type.name}")
                continue
            if not same:
                failures.append(f"{t.name}: {t.tensor_type.name} bytes differ from llama.cpp's conversion")
        print(f"  {len(r.tensors)} tensors compared with llama.cpp's conversion of {args.hf}")
        if worst:
            name = max(worst, key=worst.get)
            print(f"  Q8_0 dequantized by gguf-py: largest |error| {worst[name]:.3g} ({name})")
    for f in failures:
        print(f"FAIL {f}")
    print("ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
