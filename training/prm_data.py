"""A step-labelled set from GSM8K solutions, in TRL's stepwise format, for training and evaluating PRMs.

    python -m training.prm_data --out runs/prm-gsm8k        # -> train.jsonl, dev.jsonl, manifest.json

Every record is `{"prompt": question, "completions": [step, ...], "labels": [bool, ...], "gsm8k_index": i}`.

THE LABELS ARE SYNTHETIC: no model wrote these solutions and no person judged the steps. They come from the
reference solutions and a seeded perturbation, as follows.

- Steps are the lines of the reference solution with the `<<expr=value>>` calculator annotations removed (blank
  lines dropped); the final `#### N` line stays as the last step, verbatim, so the final answer is a step of its own.
- Each question gives one correct solution (every step True) and `wrong_per_question` wrong ones. A wrong solution
  changes ONE number in one step: in a step with an annotation, the number written right after the last annotation
  (the computed result: an arithmetic slip); otherwise the last number of the step (a misread quantity, or a wrong
  final answer in the `#### N` step). The step is drawn uniformly among the steps that hold a number (different
  steps for different wrong solutions of one question, while there are any left). The new value is the old one
  plus or minus a seeded integer (up to a quarter of its size, at least 1, in units of its trailing zeros: 540
  changes by tens, 1,200 by hundreds, so a changed number is as round as the original), never negative, written in
  the old number's format (thousands commas, decimals kept).
- Labels are True before the changed step and False from it on (a solution is wrong from its first error, the
  ProcessBench / Math-Shepherd convention). Later steps keep their original text: they still use the correct value,
  so the changed step is also inconsistent with what follows, and a wrong solution's `#### N` is still the reference
  answer unless that step is the one changed.
- Questions are split into train and dev by a seeded permutation (no question in both); everything depends only on
  the seed (per question: `numpy.random.default_rng([seed, index])`), so the files are identical on every run.

The source is the GSM8K *test* split (the only GSM8K file in shared data): a PRM trained on these questions has
seen them, so do not use it to judge a policy on GSM8K test questions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_SOURCE = "../shared/data/prompts/gsm8k_test.jsonl"
ANNOTATION = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
AFTER_ANNOTATION = re.compile(r">>\s*\$?(\d+(?:,\d{3})*(?:\.\d+)?)")


# ------------------------------------------------------------------------------------------------ one solution


def solution_steps(answer: str) -> list[str]:
    """The reference solution's steps: its non-blank lines without annotations; `#### N` last."""
    return [s for s in (_clean(line) for line in answer.split("\n")) if s]


def _clean(line: str) -> str:
    return " ".join(ANNOTATION.sub("", line).split())


def _target(line: str) -> re.Match | None:
    """The number a perturbation changes in a raw line: right after the last annotation, else the last number."""
    after = list(AFTER_ANNOTATION.finditer(line))
    if after:
        return after[-1]
    numbers = list(NUMBER.finditer(line))
    return numbers[-1] if numbers else None


def perturbed_number(text: str, rng: np.random.Generator) -> str:
    """`text` (a number as written: '1,250', '3.5', '12') plus or minus a seeded integer, in the same format; an
    integer keeps its trailing zeros (540 -> 520 or 600, never 537), so a changed number is not given away by being
    less round than the numbers around it."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = float(text.replace(",", ""))
    digits = text.replace(",", "")
    unit = 10 ** (len(digits) - len(digits.rstrip("0"))) if not decimals and value else 1  # (10 for 540, 100 for 1,200)
    span = max(1, int(abs(value) // 4 // unit))
    delta = unit * int(rng.integers(1, span + 1))
    new = value - delta if rng.random() < 0.5 and value - delta >= 0 else value + delta
    out = f"{new:,.{decimals}f}" if "," in text else f"{new:.{decimals}f}"
    return out


def perturb_line(line: str, rng: np.random.Generator) -> str | None:
    """A raw solution line with its target number changed (annotations kept; cleaned by the caller); None when the
    line holds no number."""
    match = _target(line)
    if match is None:
        return None
    start, end = match.span(1) if match.re is AFTER_ANNOTATION else match.span()
    return line[:start] + perturbed_number(line[start:end], rng) + line[end:]


def _raw_lines(answer: str) -> list[str]:
    """The raw lines that become steps (same order and count as solution_steps)."""
    return [line for line in answer.split("\n") if _clean(line)]


def wrong_solutions(answer: str, count: int, rng: np.random.Generator) -> list[tuple[list[str], list[bool], int]]:
    """Up to `count` wrong solutions: (steps, labels, index of the changed step)."""
    raw = _raw_lines(answer)
    steps = [_clean(line) for line in raw]
    candidates = [i for i, line in enumerate(raw) if _target(line) is not None]
    out = []
    for k in range(count):
        if not candidates:
            break
        pool = candidates if k >= len(candidates) else [c for c in candidates if c not in {o[2] for o in out}]
        at = int(pool[int(rng.integers(len(pool)))])
        changed = _clean(perturb_line(raw[at], rng) or raw[at])
        wrong = [*steps[:at], changed, *steps[at + 1 :]]
        out.append((wrong, [i < at for i in range(len(steps))], at))
    return out


def question_records(index: int, question: str, answer: str, seed: int, wrong_per_question: int) -> list[dict]:
    """The correct solution and its wrong variants for one GSM8K question, as TRL stepwise records."""
    rng = np.random.default_rng([seed, index])
    steps = solution_steps(answer)
    records = [{"prompt": question, "completions": steps, "labels": [True] * len(steps), "gsm8k_index": index}]
    for wrong, labels, _ in wrong_solutions(answer, wrong_per_question, rng):
        records.append({"prompt": question, "completions": wrong, "labels": labels, "gsm8k_index": index})
    return records


# ------------------------------------------------------------------------------------------------ the dataset


def split_questions(n: int, dev_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, dev) question indices, each sorted: a seeded permutation's first round(n * dev_fraction) are dev."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_dev = int(round(n * dev_fraction))
    return sorted(order[n_dev:]), sorted(order[:n_dev])


def build(rows: Sequence[dict], seed: int = 0, dev_fraction: float = 0.2,
          wrong_per_question: int = 1) -> tuple[list[dict], list[dict]]:
    """(train, dev) stepwise records from GSM8K rows ({"question", "answer"})."""
    train_idx, dev_idx = split_questions(len(rows), dev_fraction, seed)
    make = lambda idx: [r for i in idx for r in question_records(  # noqa: E731
        i, rows[i]["question"], rows[i]["answer"], seed, wrong_per_question)]
    return make(train_idx), make(dev_idx)


def summary(records: Sequence[dict]) -> dict[str, Any]:
    steps = sum(len(r["labels"]) for r in records)
    bad = sum(not x for r in records for x in r["labels"])
    wrong = sum(not all(r["labels"]) for r in records)
    return {"records": len(records), "questions": len({r["gsm8k_index"] for r in records}), "wrong_solutions": wrong,
            "steps": steps, "bad_steps": bad}


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def make_gsm8k_prm(source: str | Path, out: str | Path, seed: int = 0, dev_fraction: float = 0.2,
                   wrong_per_question: int = 1) -> dict[str, Any]:
    """Write train.jsonl, dev.jsonl and manifest.json into `out`; returns the manifest."""
    source, out = Path(source), Path(out)
    raw = source.read_bytes()
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    train, dev = build(rows, seed, dev_fraction, wrong_per_question)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "dev.jsonl", dev)
    manifest = {
        "source": str(source), "source_sha256": hashlib.sha256(raw).hexdigest(), "seed": seed,
        "dev_fraction": dev_fraction, "wrong_per_question": wrong_per_question,
        "labels": "synthetic: reference GSM8K solutions (all steps good) and one-number perturbations (bad from "
                  "the changed step on); see training/prm_data.py",
        "train": summary(train), "dev": summary(dev),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Make a step-labelled PRM set (TRL stepwise JSONL) from GSM8K solutions; the labels are synthetic."""
    parser = argparse.ArgumentParser(prog="python -m training.prm_data", description=main.__doc__)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help=f"GSM8K JSONL (default {DEFAULT_SOURCE})")
    parser.add_argument("--out", required=True, help="folder for train.jsonl, dev.jsonl, manifest.json (e.g. runs/...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the perturbations (default 0)")
    parser.add_argument("--dev-fraction", type=float, default=0.2, help="share of questions in dev (default 0.2)")
    parser.add_argument("--wrong-per-question", type=int, default=1, help="wrong solutions per question (default 1)")
    args = parser.parse_args(argv)
    if not 0 <= args.dev_fraction < 1 or args.wrong_per_question < 0:
        parser.error("--dev-fraction must be in [0, 1) and --wrong-per-question >= 0")
    manifest = make_gsm8k_prm(args.source, args.out, args.seed, args.dev_fraction, args.wrong_per_question)
    for split in ("train", "dev"):
        s = manifest[split]
        print(f"{split}: {s['records']} solutions of {s['questions']} questions, {s['steps']} steps "
              f"({s['bad_steps']} bad) -> {Path(args.out) / (split + '.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
