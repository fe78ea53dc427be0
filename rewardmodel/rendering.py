"""Inputs -> token ids, the one piece of code that serving AND training use (no train/serve skew).

Rules:
- prompt/response and messages are rendered with the reward model's own chat template when its tokenizer
  has one; otherwise with the plain format below (the HH-RLHF dialogue style).
- raw strings are tokenized as they are.
- BOS is never doubled: when the rendered text already starts with BOS and the tokenizer adds one too,
  the added one is dropped.
- Inputs longer than the limit are truncated from the LEFT, keeping the leading special tokens
  ([CLS] / BOS) and the end of the text, where the reward is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rewardmodel.inputs import MessagesInput, PromptResponseInput, RawInput

# Plain format for tokenizers without a chat template. Each turn is "\n\n<Speaker>: <content>".
PLAIN_SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    truncated: bool

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def to_messages(inp: PromptResponseInput | MessagesInput | RawInput | dict) -> list[dict[str, str]] | None:
    """The conversation as plain dicts, or None for a raw input."""
    if isinstance(inp, dict):
        if "raw" in inp:
            return None
        if "messages" in inp:
            return [{"role": m["role"], "content": m["content"]} for m in inp["messages"]]
        return [{"role": "user", "content": inp["prompt"]}, {"role": "assistant", "content": inp["response"]}]
    if isinstance(inp, RawInput):
        return None
    if isinstance(inp, PromptResponseInput):
        return [{"role": "user", "content": inp.prompt}, {"role": "assistant", "content": inp.response}]
    return [{"role": m.role, "content": m.content} for m in inp.messages]


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"\n\n{PLAIN_SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def render_text(tokenizer: Any, inp: Any) -> str:
    """The text the reward model reads for one input."""
    if isinstance(inp, RawInput):
        return inp.raw
    if isinstance(inp, dict) and "raw" in inp:
        return inp["raw"]
    messages = to_messages(inp)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render_plain(messages)


def _leading_specials(ids: Sequence[int], special: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def encode_text(tokenizer: Any, text: str, max_length: int) -> Encoded:
    """Tokenize with the tokenizer's special tokens, drop a doubled BOS, truncate from the left."""
    # verbose=False: over-long inputs are expected here (truncated below), no warning per input
    ids: list[int] = list(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if len(ids) <= max_length:
        return Encoded(ids, False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    head = min(_leading_specials(ids, special), max_length - 1) if max_length > 1 else 0
    keep_tail = max_length - head
    return Encoded(ids[:head] + ids[len(ids) - keep_tail :], True)


def encode_input(tokenizer: Any, inp: Any, max_length: int) -> Encoded:
    return encode_text(tokenizer, render_text(tokenizer, inp), max_length)


def model_max_length(tokenizer: Any, config: Any, cap: int = 0) -> int:
    """The longest input the model takes: the smaller of its positions, the tokenizer's limit and the cap."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**7:
        limits.append(tok_limit)
    if cap and cap > 0:
        limits.append(cap)
    return min(limits) if limits else 2048
