"""The one interface every generator (policy) implements, and what the three share.

A generator turns a conversation (the prompt, ending with a user turn) into N sampled assistant responses.
It renders the conversation with the POLICY's chat template (the reward model later renders prompt +
response with its own). Failures are `RewardServeError`s: INVALID_ARGUMENT (e.g. a prompt longer than the
policy takes), DEADLINE (the deadline passed while generating), GENERATOR (the generator failed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Protocol

from service.errors import ErrorKind, RewardServeError
from rewardmodel.rendering import render_plain

Messages = Sequence[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """How to sample: `n` responses, each at most `max_tokens` new tokens. temperature 0 is greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None

    @property
    def engine_seed(self) -> int | None:
        """The seed handed to the generator: the request's seed times SEED_STRIDE. vLLM seeds the i-th of n
        samples with seed + i, so requests with seeds s and s + 1 would share n - 1 candidates; spread out, seeds
        give unrelated candidate sets (for any n below the stride) and the same seed still the same ones."""
        return None if self.seed is None else self.seed * SEED_STRIDE


SEED_STRIDE = 1 << 20


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str
    """`stop` (the policy ended its turn) or `length` (max_tokens reached)."""


class Generator(Protocol):
    name: str
    """What generates (e.g. `vllm:smollm2`), reported beside the results."""

    async def start(self) -> None:
        """Load (and warm up) the policy; raise on failure."""

    async def generate(self, messages: Messages, sampling: Sampling, deadline: float | None = None) -> list[Generation]:
        """`sampling.n` responses to the conversation, in sample order; a monotonic `deadline` bounds the wait."""

    def close(self) -> None:
        """Free the policy (and stop its thread / connections)."""


def device_and_dtype(config: Any) -> tuple[str, str]:
    """Where the policy runs, as the reward model: `auto` is cuda when there is one. float32 on CPU (bf16 is
    emulated and slow there); on CUDA the configured dtype, `auto` meaning bfloat16, and bfloat16 too where the reward
    model runs an int8 precision (`int8x3` / `int8x5` are the invariant scoring forward's, not a generator's)."""
    import torch

    device = str(getattr(config, "device", "auto"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device, "float32"
    from service.backends.precision import INT8_PRODUCTS

    dtype = str(getattr(config, "dtype", "auto"))
    return device, "bfloat16" if dtype == "auto" or dtype in INT8_PRODUCTS else dtype


def as_messages(prompt: str | None = None, messages: Messages | None = None) -> list[dict[str, str]]:
    """A prompt is one user turn; messages are copied as plain dicts."""
    if messages is not None:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return [{"role": "user", "content": prompt or ""}]


def render_prompt_text(tokenizer: Any, messages: Messages) -> tuple[str, bool]:
    """The policy's prompt text, ready for the assistant's turn, and whether the tokenizer must still add its
    special tokens (True only for the plain format; a chat template writes its own)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text, False
    return render_plain(messages) + "\n\nAssistant:", True


def render_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    text, add_special = render_prompt_text(tokenizer, messages)
    ids = list(tokenizer(text, add_special_tokens=add_special, verbose=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def check_prompt_fits(prompt_tokens: int, max_model_len: int, max_tokens: int) -> None:
    """The prompt and the answer it asks for must fit the policy (as vLLM's own server checks): refused, not a
    silently shorter answer."""
    if prompt_tokens + max_tokens > max_model_len:
        raise RewardServeError(
            ErrorKind.INVALID_ARGUMENT,
            f"prompt: {prompt_tokens} tokens once rendered with the policy's template, plus max_tokens={max_tokens}, "
            f"is more than the policy takes (max_model_len={max_model_len}): shorten the prompt or ask for at most "
            f"{max(max_model_len - prompt_tokens, 0)} new tokens",
        )


def remaining_s(deadline: float | None) -> float | None:
    """Seconds left before a monotonic deadline (None: no deadline); DEADLINE if it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise deadline_error()
    return left


def deadline_error() -> RewardServeError:
    return RewardServeError(ErrorKind.DEADLINE, "deadline exceeded while generating candidates")


def generator_error(name: str, exc: BaseException | str) -> RewardServeError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return RewardServeError(ErrorKind.GENERATOR, f"generator {name} failed: {detail}")
