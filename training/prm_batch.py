"""Stepwise data for process reward models: TRL's records -> ids through `rewardmodel.steps.encode_steps` -> batches.

Records are TRL's stepwise format, `{"prompt": str, "completions": [step, ...], "labels": [bool, ...]}` (other
columns are ignored), from .jsonl / .json(.gz) / .parquet files, a `datasets.Dataset` or a list of dicts.

Every example is encoded ONCE, with `encode_steps` (the server's encoder, so no train/serve skew), into a `StepItem`:
its ids, where each step ends, and its labels. Batches put the label of a step at its end token and -100 everywhere
else, as TRL's PRMTrainer does; with `train_on_last_step_only` only the last step's end carries a label.

An example whose steps do not fit in max_length even after its prompt is cut from the left keeps the longest run of
leading steps that fits (the steps past it lose their labels, as in TRL's truncation); one whose first step alone
does not fit is dropped. Both are counted and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch

from rewardmodel.rendering import RenderError
from rewardmodel.steps import DEFAULT_SEPARATOR, encode_steps
from training.data import pad_right, parse_records, require_object

log = logging.getLogger("rewardserve.train.prm")

IGNORE = -100  # label of a position that is not a step end (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class StepExample:
    prompt: str
    steps: list[str]
    labels: list[bool]


@dataclass(frozen=True)
class StepItem:
    """One encoded example."""

    input_ids: list[int]
    step_ends: list[int]  # index in input_ids of each kept step's last token
    labels: list[bool]  # one per kept step
    steps_dropped: int = 0  # trailing steps that did not fit
    truncated: bool = False  # prompt tokens were cut from the left
    index: int = -1  # position of its example in what encode_examples was given


def parse_stepwise(record: Mapping[str, Any]) -> StepExample:
    """A TRL stepwise record -> StepExample (ValueError says what is wrong)."""
    record = require_object(record)
    prompt, steps, labels = record.get("prompt"), record.get("completions"), record.get("labels")
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string; got keys {sorted(record)}")
    if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ValueError("'completions' must be a non-empty list of non-empty strings (the steps)")
    if not isinstance(labels, (list, tuple)) or len(labels) != len(steps):
        raise ValueError(f"'labels' must be a list with one label per step ({len(steps)})")
    if not all(isinstance(x, bool) or x in (0, 1) for x in labels):
        raise ValueError("'labels' must be booleans (True: a good step)")
    return StepExample(prompt, list(steps), [bool(x) for x in labels])


def load_stepwise(source: str | Iterable[Mapping[str, Any]]) -> list[StepExample]:
    """All records of a source as StepExamples; a bad record fails with its index."""
    return parse_records(source, parse_stepwise, "stepwise")


def encode_example(tokenizer: Any, example: StepExample, max_length: int,
                   separator: str = DEFAULT_SEPARATOR) -> StepItem | None:
    """The example as the server encodes it; the longest run of leading steps that fits; None if none does.
    A step the tokenizer cannot read at all raises RenderError (whatever the length)."""
    encode = lambda steps, limit: encode_steps(tokenizer, example.prompt, steps, limit, separator)  # noqa: E731
    try:
        enc = encode(example.steps, max_length)
    except RenderError:
        encode(example.steps, 1 << 30)  # raises unless the only problem is the length
        for keep in range(len(example.steps) - 1, 0, -1):
            try:
                enc = encode(example.steps[:keep], max_length)
                break
            except RenderError:
                continue
        else:
            return None
    kept = len(enc.step_ends)
    return StepItem(enc.input_ids, enc.step_ends, example.labels[:kept], len(example.steps) - kept, enc.truncated)


def encode_examples(tokenizer: Any, examples: Sequence[StepExample], max_length: int,
                    separator: str = DEFAULT_SEPARATOR, what: str = "data") -> list[StepItem]:
    """Every example encoded; dropped examples and steps are counted in the log. Raises if nothing is left."""
    items = []
    for i, ex in enumerate(examples):
        try:
            items.append(encode_example(tokenizer, ex, max_length, separator))
        except RenderError as exc:
            raise ValueError(f"{what}: example {i}: {exc}") from None
    kept = [replace(it, index=i) for i, it in enumerate(items) if it is not None]
    cut = sum(1 for it in kept if it.steps_dropped)
    if len(kept) < len(items) or cut:
        log.warning("%s: %d of %d examples dropped (not even their first step fits in %d tokens), %d kept only their "
                    "leading steps", what, len(items) - len(kept), len(items), max_length, cut)
    if not kept:
        raise ValueError(f"{what}: no example fits in {max_length} tokens")
    return kept


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class StepBatch:
    """B examples, right-padded."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long: 1 good / 0 bad at trained step ends, -100 elsewhere
    step_mask: torch.Tensor  # (B, T) bool: True at EVERY step end (where scores are read), trained or not

    def to(self, device: torch.device | str) -> "StepBatch":
        return StepBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.step_mask)))


class StepCollator:
    """StepItems -> StepBatch; offers `lengths` for the loop's length-grouped order."""

    def __init__(self, pad_token_id: int, train_on_last_step_only: bool = False):
        self.pad_token_id = pad_token_id
        self.train_on_last_step_only = train_on_last_step_only

    def lengths(self, items: Sequence[StepItem]) -> list[int]:
        return [len(it.input_ids) for it in items]

    def __call__(self, items: Sequence[StepItem]) -> StepBatch:
        if not items:
            raise ValueError("cannot collate an empty list of examples")
        input_ids, attention_mask = pad_right([it.input_ids for it in items], self.pad_token_id)  # (B, T) each
        labels = torch.full_like(input_ids, IGNORE)  # (B, T)
        step_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # (B, T)
        for row, it in enumerate(items):
            step_mask[row, it.step_ends] = True
            trained = range(len(it.step_ends) - 1, len(it.step_ends)) if self.train_on_last_step_only else range(len(it.step_ends))
            for j in trained:
                labels[row, it.step_ends[j]] = int(it.labels[j])
        return StepBatch(input_ids, attention_mask, labels, step_mask)


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # never read: masked out
