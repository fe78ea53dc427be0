"""The benchmark workload: a deterministic list of (prompt, response) pairs whose rendered token lengths are
spread uniformly over [min_tokens, max_tokens] and shuffled with a fixed seed.

Texts come from the HH-RLHF harmless dev split (`../shared/data/hh_harmless/dev.jsonl.gz` from the repo root),
cut to the target token count; without that file, from synthetic words. The HH texts hold red-team content:
nothing here (or in the callers) ever prints a text, only lengths.

A pair's length is what the server scores: `rewardmodel.rendering.encode_input` (the model's own rendering and
special tokens), so every system sees exactly these token counts.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rewardmodel.modeling import ModelSource
from rewardmodel.rendering import encode_input, model_max_length

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "hh_harmless" / "dev.jsonl.gz"
TURN = re.compile(r"\n\n(Human|Assistant): ")
MIN_WORDS = 5000  # fewer usable words than this in the file: fall back to synthetic text

SYNTHETIC_VOCAB = (
    "the model reads a prompt and scores the response with one number that says how good it is for the user "
    "when training a policy we sample many answers then rank them by reward and keep the best ones while the "
    "value of each token depends on context length batch size and the speed of the machine running inference "
    "people often ask simple questions about cooking travel science history music sports weather and health"
).split()


def served_max_length(source: ModelSource, tokenizer: Any) -> int:
    """The longest input the server takes for this model (as the HF backend computes it, without --max-tokens)."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return model_max_length(tokenizer, AutoConfig.from_pretrained(str(source.path), **kwargs))


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    tokens: int  # rendered length, special tokens included

    def as_input(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response}


def target_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n lengths evenly spaced over [lo, hi], shuffled deterministically."""
    if n <= 1:
        return [(lo + hi) // 2] * max(n, 0)
    lengths = [round(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    random.Random(seed).shuffle(lengths)
    return lengths


def _hh_streams(path: Path) -> tuple[list[str], list[str]] | None:
    """(human words, assistant words) from the HH file, in file order; None if absent or too small."""
    if not path.is_file():
        return None
    human: list[str] = []
    assistant: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            parts = TURN.split("\n\n" + record.get("chosen", "").lstrip("\n"))
            for speaker, text in zip(parts[1::2], parts[2::2]):
                (human if speaker == "Human" else assistant).extend(text.split())
    if len(human) < MIN_WORDS or len(assistant) < MIN_WORDS:
        return None
    return human, assistant


def _synthetic_streams(seed: int, n_words: int = 60000) -> tuple[list[str], list[str]]:
    rng = random.Random(seed + 1)
    return ([rng.choice(SYNTHETIC_VOCAB) for _ in range(n_words)], [rng.choice(SYNTHETIC_VOCAB) for _ in range(n_words)])


def _words(stream: list[str], start: int, k: int) -> str:
    """k consecutive words from `start`, wrapping around."""
    n = len(stream)
    return " ".join(stream[(start + j) % n] for j in range(k))


def _longest_fit(fits: Callable[[int], bool], upper: int) -> int:
    """The largest k in [0, upper] with fits(k), assuming fits is monotone (true then false)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _make_pair(tokenizer: Any, max_length: int, target: int, human: list[str], assistant: list[str],
               rng: random.Random, overhead: int) -> Pair:
    content = max(0, target - overhead)
    prompt_budget = round(content * rng.uniform(0.2, 0.5))
    h0, a0 = rng.randrange(len(human)), rng.randrange(len(assistant))

    def prompt_tokens(k: int) -> int:
        return len(tokenizer(_words(human, h0, k), add_special_tokens=False)["input_ids"])

    def total(prompt: str, k: int) -> int:
        return encode_input(tokenizer, {"prompt": prompt, "response": _words(assistant, a0, k)}, max_length).tokens

    k_prompt = _longest_fit(lambda k: prompt_tokens(k) <= prompt_budget, prompt_budget)
    prompt = _words(human, h0, k_prompt)
    k_resp = _longest_fit(lambda k: total(prompt, k) <= target, content + 1)
    response = _words(assistant, a0, k_resp)
    return Pair(prompt, response, total(prompt, k_resp))


def build_pairs(tokenizer: Any, max_length: int, n: int, lo: int, hi: int, seed: int = 0,
                data_path: Path | None = DEFAULT_DATA) -> tuple[list[Pair], str]:
    """The workload and where its text came from ("hh_harmless:<file>" or "synthetic")."""
    if hi > max_length:
        raise ValueError(f"--max-tokens {hi} is longer than the model takes ({max_length})")
    streams = _hh_streams(Path(data_path)) if data_path is not None else None
    source = f"hh_harmless:{Path(data_path).name}" if streams else "synthetic"
    human, assistant = streams or _synthetic_streams(seed)
    overhead = encode_input(tokenizer, {"prompt": "", "response": ""}, max_length).tokens
    if lo < overhead + 2:
        raise ValueError(f"--min-tokens {lo} is too short: the template alone takes {overhead} tokens")
    rng = random.Random(seed)
    pairs = [_make_pair(tokenizer, max_length, t, human, assistant, rng, overhead) for t in target_lengths(n, lo, hi, seed)]
    return pairs, source


def describe(pairs: list[Pair]) -> dict[str, Any]:
    """Length statistics of the workload (never the texts)."""
    lengths = sorted(p.tokens for p in pairs)
    n = len(lengths)
    return {
        "n_pairs": n,
        "min": lengths[0] if n else None,
        "max": lengths[-1] if n else None,
        "mean": round(sum(lengths) / n, 1) if n else None,
        "median": lengths[n // 2] if n else None,
        "total_tokens": sum(lengths),
    }
