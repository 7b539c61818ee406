#!/usr/bin/env python3
"""The peer baseline: Hugging Face TRL + PEFT + bitsandbytes (QLoRA) on a make_model.py folder.

    python3 bench/trl_baseline.py --model DIR --algo dpo --batch 8 --max-length 256
    python3 bench/trl_baseline.py --model DIR --algo grpo --prompts 2 --group 8 --completion-len 128

The workload `rlhf bench` runs with the same flags (keep the two identical when comparing): a
4-bit NF4 base with double quantization and bf16 compute, LoRA r=16 alpha=32 dropout 0 on q, k, v,
o, gate, up and down of every block, gradient checkpointing, AdamW at lr 5e-6, seed 0, reference
model = the base with the adapter disabled; DPO beta 0.1 with the sigmoid loss; GRPO beta 0.04,
temperature 1, completions forced to --completion-len tokens, reward = how often the row's answer
word occurs in the completion.

Prints one JSON line: the median seconds per optimizer step after --warmup untimed steps (the GPU
synchronized at both ends of each step), tokens per step and per second (DPO: batch x 2 x
max-length; GRPO: prompts x group x completion-len), peak CUDA memory (allocated and reserved,
GiB), and the versions and device it ran on. Also writes it to OUT/trl_<algo>.json when the folder
--out (default $OUT) exists. Needs torch, transformers, peft, trl, bitsandbytes, datasets.
"""
import argparse
import json
import os
import statistics
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--algo", choices=["dpo", "grpo"], required=True)
    ap.add_argument("--batch", type=int, default=4, help="DPO: preference pairs per step")
    ap.add_argument("--prompts", type=int, default=4, help="GRPO: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="GRPO: completions per prompt")
    ap.add_argument("--completion-len", type=int, default=128, help="GRPO: tokens per completion")
    ap.add_argument("--max-length", type=int, default=256, help="DPO: prompt + completion tokens")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    ap.add_argument("--no-quant", action="store_true", help="bf16 base instead of 4-bit")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()

    import peft
    import torch
    import transformers
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              TrainerCallback)

    tok = AutoTokenizer.from_pretrained(a.model)
    quant = None if a.no_quant else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map={"": 0})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])

    times = []
    card = [0.0]

    def card_gib():
        """This process's device memory as nvidia-smi shows it (context + PyTorch's reservation)."""
        import subprocess
        try:
            rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                   "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return 0.0
        for r in rows:
            pid, _, mib = r.partition(",")
            if pid.strip() == str(os.getpid()) and mib.strip().isdigit():
                return int(mib) / 1024
        return 0.0

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            # Read after the step's clock stopped; the reservation only grows, so the last
            # reading is the peak of this process's card memory.
            card[0] = max(card[0], card_gib())

    common = dict(output_dir=tempfile.mkdtemp(prefix="trl_out"), max_steps=a.steps + a.warmup,
                  learning_rate=5e-6, bf16=True, gradient_checkpointing=True, logging_steps=1000,
                  save_strategy="no", report_to=[], disable_tqdm=True,
                  gradient_accumulation_steps=1, seed=0)
    torch.cuda.reset_peak_memory_stats()
    if a.algo == "dpo":
        from trl import DPOConfig, DPOTrainer
        ds = load_dataset("json", data_files=os.path.join(a.model, "dpo.jsonl"), split="train")
        cfg = DPOConfig(per_device_train_batch_size=a.batch, max_length=a.max_length, beta=0.1,
                        loss_type=["sigmoid"], **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                             peft_config=lora, callbacks=[Timer()])
        tokens_per_step = a.batch * 2 * a.max_length
    else:
        from trl import GRPOConfig, GRPOTrainer
        ds = load_dataset("json", data_files=os.path.join(a.model, "grpo.jsonl"), split="train")

        def reward(completions, answer, **kw):
            return [float(c.split().count(ans)) for c, ans in zip(completions, answer)]

        cfg = GRPOConfig(per_device_train_batch_size=a.prompts * a.group,
                         num_generations=a.group, max_completion_length=a.completion_len,
                         beta=0.04, temperature=1.0,
                         generation_kwargs={"min_new_tokens": a.completion_len}, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=tok, peft_config=lora, callbacks=[Timer()])
        tokens_per_step = a.prompts * a.group * a.completion_len
    trainer.train()

    steady = times[a.warmup:] or times
    sec = statistics.median(steady)
    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    res = {"system": "trl", "algo": a.algo, "model": a.model, "quant": not a.no_quant,
           "sec_per_step": round(sec, 4), "tokens_per_step": tokens_per_step,
           "tokens_per_sec": round(tokens_per_step / sec, 1),
           "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
           "peak_process_gib": round(card[0], 3) or None,
           "steps_timed": len(steady), "gpu": torch.cuda.get_device_name(0),
           "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "torch": torch.__version__,
                        "bitsandbytes": bnb_version}}
    print(json.dumps(res), flush=True)
    if a.out and os.path.isdir(a.out):
        with open(os.path.join(a.out, f"trl_{a.algo}.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
