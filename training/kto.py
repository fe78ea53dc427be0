"""KTO for `rewardserve train dpo --loss-type kto`: unpaired examples, their batches, and the step.

Examples are (prompt, completion, desirable?). They come from TRL's unpaired format
`{"prompt", "completion", "label": bool}` (strings or messages), or from any preference record training.data reads
(HH-RLHF dialogues, explicit-prompt or conversational pairs): a pair gives two examples, its chosen completion
desirable and its rejected one undesirable (as TRL's `unpair_preference_dataset`). Each example is tokenized on its
own with the chat template (training.policy.split_completions), so its ids equal TRL's KTOTrainer's.

A batch of B examples carries, beside its B rows, B mismatched rows for KTO's reference point: row i pairs prompt i
with the completion of example i - 1 (the completions rotated by one within the batch, as in the KTO paper and TRL).
With B = 1 the mismatched row is the example itself: use batches of several examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.data import Message, _messages, pad_right, parse_record, parse_records, require_object
from training.losses import kto_loss, kto_reference_point
from training.policy import fit, report_cut, split_completions

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KTOExample:
    prompt_messages: list[Message]
    completion: list[Message]  # ends with the assistant's message
    desirable: bool


def _turns(value: Any, role: str, what: str) -> list[Message]:
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, what)


def parse_unpaired(record: Mapping[str, Any]) -> list[KTOExample]:
    """One record -> one example (unpaired format) or two (a preference pair)."""
    record = require_object(record)
    if "completion" in record and "label" in record:
        if not isinstance(record["label"], bool):
            raise ValueError(f"label must be true or false, got {record['label']!r}")
        prompt = _turns(record.get("prompt"), "user", "prompt")
        completion = _turns(record["completion"], "assistant", "completion")
        if completion[-1]["role"] != "assistant":
            raise ValueError("completion: the last message must be the assistant's")
        return [KTOExample(prompt, completion, record["label"])]
    pair = parse_record(record)
    return [KTOExample(pair.prompt_messages, pair.chosen, True), KTOExample(pair.prompt_messages, pair.rejected, False)]


def load_unpaired(source: str | Iterable[Mapping[str, Any]]) -> list[KTOExample]:
    """Every record of a source as KTO examples (pairs split in two); a bad record fails with its index."""
    return [ex for examples in parse_records(source, parse_unpaired, "KTO") for ex in examples]


# ---------------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class KTOItem:
    prompt: list[int]
    completion: list[int]
    desirable: bool


def tokenize_unpaired(tokenizer: Any, examples: Sequence[KTOExample], max_length: int, name: Any = None
                      ) -> list[KTOItem]:
    """The examples' ids, fit into max_length; how many were cut is logged, naming the source `name`."""
    items, cut = [], 0
    for ex in examples:
        prompt, (completion,) = split_completions(tokenizer, ex.prompt_messages, [ex.completion])
        cut += len(prompt) + len(completion) > max_length
        prompt, (completion,) = fit(prompt, [completion], max_length)
        items.append(KTOItem(prompt, completion, ex.desirable))
    report_cut(name, cut, len(items), "examples", "--max-length", max_length)
    return items


@dataclass
class KTOBatch:
    """B examples as right-padded rows prompt + completion, and B mismatched rows prompt_i + completion_{i-1}."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T)
    kl_input_ids: torch.Tensor  # (B, T')
    kl_attention_mask: torch.Tensor  # (B, T')
    kl_completion_mask: torch.Tensor  # (B, T')
    desirable: torch.Tensor  # (B,) bool

    def to(self, device: Any) -> KTOBatch:
        return KTOBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def _rows(prompts: Sequence[list[int]], completions: Sequence[list[int]], max_length: int, pad_id: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [(p + c)[:max_length] for p, c in zip(prompts, completions)]
    masks = [([0] * len(p) + [1] * len(c))[:max_length] for p, c in zip(prompts, completions)]
    ids, attention = pad_right(rows, pad_id)  # (B, T), (B, T)
    completion_mask, _ = pad_right(masks, 0)  # (B, T)
    return ids, attention, completion_mask


class KTOCollator:
    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def lengths(self, items: Sequence[KTOItem]) -> list[int]:
        return [len(i.prompt) + len(i.completion) for i in items]

    def __call__(self, items: Sequence[KTOItem]) -> KTOBatch:
        prompts, completions = [i.prompt for i in items], [i.completion for i in items]
        rotated = completions[-1:] + completions[:-1]  # example i gets the completion of example i - 1
        matched = _rows(prompts, completions, self.max_length, self.pad_token_id)
        mismatched = _rows(prompts, rotated, self.max_length, self.pad_token_id)
        return KTOBatch(*matched, *mismatched, torch.tensor([i.desirable for i in items], dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------- step


def _reference_point(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """z_0 over the batch of every process (the mean of all mismatched log-ratios, then max(0, .))."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return kto_reference_point(policy_kl, ref_kl)
    stats = torch.stack([(policy_kl.float() - ref_kl.float()).sum(), torch.tensor(float(len(policy_kl)),
                                                                            device=policy_kl.device)])
    torch.distributed.all_reduce(stats)
    return (stats[0] / stats[1]).detach().clamp_min(0)


def kto_step(model: torch.nn.Module, batch: KTOBatch, beta: float, desirable_weight: float,
             undesirable_weight: float) -> tuple[torch.Tensor, Metrics]:
    """KTO loss on one batch: the mismatched rows (no gradient) give z_0, then the matched rows the loss."""
    with torch.no_grad():
        kl_policy, kl_ref = model(batch.kl_input_ids, batch.kl_attention_mask, batch.kl_completion_mask)  # (B,) each
    logps, ref = model(batch.input_ids, batch.attention_mask, batch.completion_mask)  # (B,) each
    z = _reference_point(kl_policy, kl_ref)
    return kto_loss(logps, ref, batch.desirable, z, beta, desirable_weight, undesirable_weight)
