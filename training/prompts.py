"""Prompt datasets for PPO: one conversation to continue per record.

Accepted records (JSONL / JSON / parquet, a saved `datasets` folder, or any iterable of dicts, read by
training.data.read_records):
- "a string"                      one user message (so a JSON list of strings is a prompt list)
- {"prompt": str}                 one user message
- {"prompt": [messages]}          TRL's conversational prompt
- {"messages": [messages]}        a conversation; a trailing assistant message (a reference answer) is dropped
- {"turns": [str, ...]}           MT-Bench questions: the first turn is the prompt
- {"question": str}               GSM8K-style
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.data import Message, _messages, parse_records, require_object
from training.policy import all_prompt_ids


def parse_prompt(record: Mapping[str, Any] | str) -> list[Message]:
    """One record (an object, or a plain string: one user message) -> the messages to continue (ValueError says what
    is wrong)."""
    if isinstance(record, str):
        record = {"prompt": record}
    record = require_object(record)
    if "prompt" in record:
        value = record["prompt"]
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")
    elif "messages" in record:
        messages = _messages(record["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, (list, tuple)) or not turns or not isinstance(turns[0], str):
            raise ValueError("turns: expected a non-empty list of strings")
        messages = [{"role": "user", "content": turns[0]}]
    elif "question" in record:
        if not isinstance(record["question"], str):
            raise ValueError(f"question: expected a string, got {record['question']!r}")
        messages = [{"role": "user", "content": record["question"]}]
    else:
        raise ValueError(f"no prompt: a prompt record needs 'prompt', 'messages', 'turns' or 'question' (or is a "
                         f"string); got keys {sorted(record)}")
    if not messages or messages[-1]["role"] == "assistant" or not any(m["content"].strip() for m in messages):
        raise ValueError("the prompt must end with a user (or system) message and say something")
    return messages


def load_prompts(source: str | Iterable[Mapping[str, Any] | str]) -> list[list[Message]]:
    """Every record of a source as the messages to continue; a bad record fails with its index, no record at all too."""
    out = parse_records(source, parse_prompt, "prompt")
    if not out:
        raise ValueError(f"{source}: no prompts")
    return out


@dataclass(frozen=True)
class PromptItem:
    messages: list[Message]
    ids: list[int]  # the prompt with its generation prompt, cut from the left to max_prompt_length


@dataclass
class PromptBatch:
    items: list[PromptItem]

    def to(self, device: Any) -> PromptBatch:
        return self  # token ids stay lists until the rollout pads them

    def __len__(self) -> int:
        return len(self.items)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[list[Message]], max_prompt_length: int, name: Any = None
                     ) -> list[PromptItem]:
    """The prompts' ids (cut from the left to max_prompt_length; how many were cut is logged, naming `name`)."""
    ids = all_prompt_ids(tokenizer, prompts, max_prompt_length, name)
    return [PromptItem(m, i) for m, i in zip(prompts, ids)]


class PromptCollator:
    def lengths(self, items: Sequence[PromptItem]) -> list[int]:
        return [len(i.ids) for i in items]

    def __call__(self, items: Sequence[PromptItem]) -> PromptBatch:
        return PromptBatch(list(items))


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (N, T), padded on the left (what generate() wants)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask
