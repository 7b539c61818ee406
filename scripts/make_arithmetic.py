#!/usr/bin/env python3
"""Writes small arithmetic problems for the GRPO example (configs/grpo-smollm2-arithmetic.toml).

Each line of the JSONL output is a GRPO prompt row in TRL's conversational layout plus a
GSM8K-style answer column, which the `exact_answer` reward reads:

    {"prompt": [{"role": "user", "content": "What is 7 + 5? ..."}], "answer": "7 + 5 = 12\n#### 12"}

Deterministic: the same --seed and --n always give the same file. Standard library only.
"""

import argparse
import json
import os
import random


def problem(rng: random.Random) -> tuple[str, int]:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{a} * {b}", a * b
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    if op == "-" and b > a:
        a, b = b, a
    return f"{a} {op} {b}", a + b if op == "+" else a - b


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "arithmetic.jsonl"))
    ap.add_argument("--n", type=int, default=1000, help="number of problems")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if args.n <= 0:
        ap.error("--n must be positive")

    rng = random.Random(args.seed)
    out = os.path.normpath(args.out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(args.n):
            expr, value = problem(rng)
            row = {
                "prompt": [
                    {
                        "role": "user",
                        "content": f"What is {expr}? Reply with the result only.",
                    }
                ],
                "answer": f"{expr} = {value}\n#### {value}",
            }
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    print(f"make_arithmetic: wrote {args.n} problems to {out}")


if __name__ == "__main__":
    main()
