"""Seeded arithmetic prompts with reference answers, for GRPO demonstrations (one JSONL file per split).

    python scripts/arithmetic_prompts.py --out runs/arith --train 256 --heldout 100 --seed 0

Each line is {"question": "What is 37 + 48? ...", "answer": "#### 85"} (training.grpo reads "answer" as the reference).
Questions are drawn without repetition; no question is in both splits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATE = "What is {a} {op} {b}? Answer with the number only."


def questions(n: int, seed: int, low: int, high: int, ops: str) -> list[dict]:
    rng = random.Random(seed)
    seen: set[tuple] = set()
    out = []
    while len(out) < n:
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append({"question": TEMPLATE.format(a=a, op=op, b=b), "answer": f"#### {value}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--low", type=int, default=10)
    parser.add_argument("--high", type=int, default=99)
    parser.add_argument("--ops", default="+", help="operators to draw from, e.g. '+-'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = questions(args.train + args.heldout, args.seed, args.low, args.high, args.ops)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[: args.train]), ("heldout", rows[args.train :])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
