#!/usr/bin/env python3
"""Checks `rlhf merge` against Hugging Face transformers + PEFT, the reference, on the CPU.

    pip install torch transformers peft safetensors bitsandbytes   # CPU torch is enough
    python3 scripts/check_hf_merge.py fixtures DIR
    python3 scripts/check_hf_merge.py causal --base DIR/base --adapter A --merged M [--merged-bf16 M2]
    python3 scripts/check_hf_merge.py reward --base DIR/base --adapter A --merged M \
        [--rlhf-scores f32=S.json] [--rlhf-scores nf4=S.json]

`fixtures` writes a seeded random Llama (transformers' `LlamaForCausalLM`, save_pretrained) with
a word-level tokenizer, SFT and preference data for `rlhf sft` / `rlhf rm`, token rows to score,
and two adapters made by PEFT itself with random nonzero B (a causal one, and a SEQ_CLS one with
its `score` in modules_to_save), so `rlhf merge` is also fed PEFT's own files.

`causal`: base + adapter through `PeftModel.from_pretrained` against the merged folder through
`AutoModelForCausalLM.from_pretrained`, logits at every real token in f32; fails beyond 1e-3. The
bf16 merge (read back in f32) must equal PEFT's `merge_and_unload` rounded to bf16 within one
bf16 step per weight; its logit error is printed beside that of the reference's own rounding.

`reward`: the base as `LlamaForSequenceClassification` + the adapter (its `score` module) through
PEFT against `AutoModelForSequenceClassification` on the merged folder (1e-3), and against the
scores `rlhf` itself computes (`cargo run --example score`): `f32` within 1e-4 (rlhf reads the
unquantized base); `nf4` (rlhf quantizes the base) within 1e-2 of PEFT on bitsandbytes' NF4
round trip of the base (`pip install bitsandbytes`; its CPU backend), computed in f32, with the
distance to the f32 scores printed.

Every check also prints the adapter's own effect, which must be far above the tolerance, or the
check could not fail. Exits 1 on any failure. `scripts/check_hf_parity.sh` runs it all.
"""

import argparse
import json
import os
import random
import sys

# Everything is made here; nothing may come from the Hub (bitsandbytes asks it for CPU kernels
# and falls back to its own).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["MARK"] + [f"w{i}" for i in range(40)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


# ---------------------------------------------------------------- fixtures


def write_base(out, seed):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = SPECIALS + WORDS
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    # HF's init (std 0.02) makes logits of a few hundredths; unit-variance activations give
    # logits of order one, so a tolerance of 1e-3 means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.normal_(0.0, std)
    model.save_pretrained(out, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(out)


def write_data(out, seed):
    rng = random.Random(seed)

    def words(n):
        return [f"w{rng.randrange(40)}" for _ in range(n)]

    with open(os.path.join(out, "sft.jsonl"), "w") as f:
        for _ in range(64):
            p = words(3)
            f.write(json.dumps({"prompt": " ".join(p), "completion": f" MARK {p[0]} MARK"}) + "\n")
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        for _ in range(64):
            chosen = words(4)
            chosen.insert(rng.randrange(5), "MARK")
            f.write(json.dumps({"prompt": " ".join(words(3)), "chosen": " ".join(chosen),
                                "rejected": " ".join(words(5))}) + "\n")
    # Token rows of unequal length (right-padded by each side as it pads): no pad id inside.
    first = len(SPECIALS)
    rows = [[1] + [rng.randrange(first, first + len(WORDS)) for _ in range(n)]
            for n in (11, 7, 15, 4)]
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump(rows, f)


def write_peft_adapter(base, out, seq_cls, seed):
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    model = load_base(base, seq_cls)
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                     init_lora_weights=False,
                     task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM)
    peft_model = get_peft_model(model, cfg)
    # init_lora_weights=False draws B too; scale it so the delta is a fair share of W.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            if seq_cls and "score" in name and "modules_to_save" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)


def fixtures(args):
    os.makedirs(args.dir, exist_ok=True)
    base = os.path.join(args.dir, "base")
    write_base(base, args.seed)
    write_data(args.dir, args.seed + 1)
    write_peft_adapter(base, os.path.join(args.dir, "peft-causal"), False, args.seed + 2)
    write_peft_adapter(base, os.path.join(args.dir, "peft-reward"), True, args.seed + 3)
    print(f"fixtures in {args.dir}")


# ---------------------------------------------------------------- checks


def load_base(path, seq_cls, nf4=False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if nf4:
        import bitsandbytes  # noqa: F401  (transformers' message for its absence is vaguer)
        from transformers import BitsAndBytesConfig

        # As rlhf quantizes: NF4, double quantization, blocks of 64; f32 compute.
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kw["device_map"] = "cpu"
    if seq_cls:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw).eval()
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def load_peft(base, adapter, seq_cls, nf4=False):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base, seq_cls, nf4), adapter).eval()


def batch(rows, pad_id):
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask


def real_logits(model, rows, pad_id):
    """Logits at every real (non-padding) position, concatenated: [tokens, vocab]."""
    ids, mask = batch(rows, pad_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    return out[mask.bool()]


def scores(model, rows, pad_id):
    ids, mask = batch(rows, pad_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()[:, 0]


def maxdiff(a, b):
    return (a - b).abs().max().item()


def read_rows(args):
    with open(args.rows or os.path.join(os.path.dirname(os.path.abspath(args.base)), "rows.json")) as f:
        return json.load(f)


def bf16_steps(got, want):
    """The largest distance, in bf16 steps, between `got` (bf16 values) and `want` rounded to bf16."""
    def ordinal(t):
        i = t.to(torch.bfloat16).view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)  # sign-magnitude -> ordered integers
    return (ordinal(got) - ordinal(want)).abs().max().item()


def causal(args):
    from transformers import AutoConfig

    rows = read_rows(args)
    pad = AutoConfig.from_pretrained(args.base).pad_token_id or 0
    peft_model = load_peft(args.base, args.adapter, False)
    want = real_logits(peft_model, rows, pad)
    with peft_model.disable_adapter():
        plain = real_logits(peft_model, rows, pad)
    merged = load_base(args.merged, False)
    got = real_logits(merged, rows, pad)
    scale, effect, err = want.abs().max().item(), maxdiff(want, plain), maxdiff(want, got)
    print(f"causal {args.adapter}: {want.shape[0]} tokens x {want.shape[1]} logits, largest "
          f"|logit| {scale:.3f}, adapter effect {effect:.4f}")
    print(f"  f32 merge vs PEFT base+adapter: max |diff| {err:.3e}")
    check(effect > 100 * args.tol, f"adapter effect {effect:.4f} is over 100x the tolerance {args.tol}")
    check(err <= args.tol, f"f32 merged logits within {args.tol} of PEFT's (max {err:.3e})")

    # The reference merge: PEFT's own W + scale*BA, tensor by tensor.
    ref = {k: v.float() for k, v in peft_model.merge_and_unload().state_dict().items()}
    mine = merged.state_dict()
    wdiff = max(maxdiff(mine[k].float(), v) for k, v in ref.items())
    print(f"  f32 merge weights vs PEFT merge_and_unload: max |diff| {wdiff:.3e}")
    check(set(mine) == set(ref), "merged folder holds exactly PEFT's merged tensors")
    if args.merged_bf16:
        m16 = load_base(args.merged_bf16, False)  # bf16 weights, upcast to f32 on load
        got16 = real_logits(m16, rows, pad)
        ref16 = load_base(args.merged, False)
        with torch.no_grad():
            ref16.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.items()})
        want16 = real_logits(ref16, rows, pad)
        steps = max(bf16_steps(m16.state_dict()[k], v) for k, v in ref.items())
        e16, r16 = maxdiff(want, got16), maxdiff(want, want16)
        print(f"  bf16 merge vs PEFT base+adapter: max |diff| {e16:.3e} (PEFT's merge rounded to "
              f"bf16: {r16:.3e}); weights within {steps} bf16 step(s) of PEFT's merge rounded")
        check(steps <= 1, f"bf16 weights within one bf16 step of PEFT's merge ({steps})")
        check(effect > 5 * e16, f"adapter effect {effect:.4f} is over 5x the bf16 error {e16:.3e}")


def reward(args):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    rows = read_rows(args)
    merged_cfg = AutoConfig.from_pretrained(args.merged)
    pad = merged_cfg.pad_token_id
    check(merged_cfg.architectures == ["LlamaForSequenceClassification"] and merged_cfg.num_labels == 1,
          f"merged config is a one-label LlamaForSequenceClassification ({merged_cfg.architectures})")
    check(all(pad not in r for r in rows), f"rows hold no pad id ({pad}): the scored token is the last")
    peft_model = load_peft(args.base, args.adapter, True)
    head = [v for k, v in load_file(os.path.join(args.adapter, "adapter_model.safetensors")).items()
            if k.endswith("score.weight")]
    check(len(head) == 1, "the adapter holds one score.weight")
    live = peft_model.get_base_model().score
    live_w = (live.modules_to_save["default"] if hasattr(live, "modules_to_save") else live).weight
    check(torch.equal(live_w, head[0]), "PEFT applies the adapter's score head "
          f"(as {'modules_to_save' if hasattr(live, 'modules_to_save') else 'a plain weight'})")
    want = scores(peft_model, rows, pad)
    # The LoRA's own effect: the same head on the plain base.
    plain_model = load_base(args.base, True)
    with torch.no_grad():
        plain_model.score.weight.copy_(head[0])
    plain = scores(plain_model, rows, pad)
    got = scores(load_base(args.merged, True), rows, pad)
    effect, err = maxdiff(want, plain), maxdiff(want, got)
    print(f"reward {args.adapter}: PEFT scores {[round(x, 4) for x in want.tolist()]}, "
          f"adapter effect {effect:.4f}")
    print(f"  merged folder vs PEFT base+adapter: max |diff| {err:.3e}")
    check(effect > 100 * args.tol, f"adapter effect {effect:.4f} is over 100x the tolerance {args.tol}")
    check(err <= args.tol, f"merged scores within {args.tol} of PEFT's (max {err:.3e})")
    for spec in args.rlhf_scores:
        label, path = spec.split("=", 1)
        with open(path) as f:
            mine = torch.tensor(json.load(f)["scores"])
        e = maxdiff(want, mine)
        print(f"  rlhf ({label} base) vs PEFT base+adapter: max |diff| {e:.3e}, scores "
              f"{[round(x, 4) for x in mine.tolist()]}")
        if label != "nf4":
            check(e <= 1e-4, f"rlhf {label} scores within 1e-4 of PEFT's (max {e:.3e})")
            continue
        # NF4 moves each base weight by ~9% of its spread (RMS), so an NF4 score is not the f32
        # score; the reference is the same adapter on bitsandbytes' NF4 base (QLoRA's setup).
        try:
            want4 = scores(nf4_reference(args.base, args.adapter), rows, pad)
            fused = scores(load_peft(args.base, args.adapter, True, nf4=True), rows, pad)
        except ImportError as err:
            print(f"  no NF4 reference ({err}): pip install bitsandbytes")
            check(False, "rlhf nf4 scores checked against bitsandbytes' NF4 base")
            continue
        e4 = maxdiff(want4, mine)
        print(f"  rlhf (nf4 base) vs PEFT on bitsandbytes' NF4 weights, f32 compute: max |diff| "
              f"{e4:.3e} (those vs the f32 scores: {maxdiff(want4, want):.3e}; bitsandbytes' own "
              f"CPU Linear4bit forward, bf16 inside: {maxdiff(fused, mine):.3e} from rlhf's)")
        check(e4 <= 1e-2, f"rlhf nf4 scores within 1e-2 of PEFT's on an NF4 base (max {e4:.3e})")


def nf4_reference(base, adapter):
    """PEFT's sequence classifier whose frozen projections hold bitsandbytes' NF4 round trip of
    the base weights (NF4, double quantization, blocks of 64), computed in f32: what QLoRA with
    `bnb_4bit_compute_dtype=float32` computes on CUDA (dequantize, then an f32 matmul).
    bitsandbytes' own CPU `Linear4bit` forward is no f32 reference: on CPUs with AVX512-BF16 it
    runs a fused kernel that casts the activations to bf16."""
    import bitsandbytes.functional as F

    model = load_peft(base, adapter, True)
    n = 0
    with torch.no_grad():
        for name, mod in model.get_base_model().named_modules():
            if (isinstance(mod, torch.nn.Linear) and "lora_" not in name
                    and any(f".{t}" in name for t in TARGETS)):
                q, state = F.quantize_4bit(mod.weight.data, blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
                mod.weight.copy_(F.dequantize_4bit(q, state).float())
                n += 1
    layers = model.get_base_model().config.num_hidden_layers
    assert n == len(TARGETS) * layers, f"{n} projections quantized"
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures")
    f.add_argument("dir")
    f.add_argument("--seed", type=int, default=5)
    for name in ("causal", "reward"):
        c = sub.add_parser(name)
        c.add_argument("--base", required=True)
        c.add_argument("--adapter", required=True)
        c.add_argument("--merged", required=True)
        c.add_argument("--rows", help="token rows (JSON); default: rows.json beside --base")
        c.add_argument("--tol", type=float, default=1e-3)
        if name == "causal":
            c.add_argument("--merged-bf16")
        else:
            c.add_argument("--rlhf-scores", action="append", default=[], metavar="LABEL=FILE")
    args = ap.parse_args()
    torch.manual_seed(0)
    {"fixtures": fixtures, "causal": causal, "reward": reward}[args.cmd](args)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
