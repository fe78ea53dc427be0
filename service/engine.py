"""RewardEngine: validate, render, admit, batch, (optionally) normalize. Transport-free.

Both transports hold the same engine object; they decode into `service.schemas` inputs, call `score`,
and encode the result. Errors are `RewardServeError`s, translated at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from service import metrics
from service.batcher import DynamicBatcher
from service.config import ServeConfig
from service.errors import ErrorKind, RewardServeError, invalid
from rewardmodel.normalization import RewardStats, load_stats
from rewardmodel.rendering import Encoded, encode_input
from service.schemas import ScoreResult

log = logging.getLogger("rewardserve.engine")

# Inputs this many or more are tokenized off the event loop (tokenizing costs ~0.5 ms per pair).
TOKENIZE_INLINE_MAX = 4


@dataclass
class ScoreOutcome:
    model: str
    results: list[ScoreResult]
    queue_s: float
    compute_s: float


class RewardEngine:
    def __init__(self, config: ServeConfig, backend: Any):
        self.config = config
        self.backend = backend
        self.name = backend.name
        self.tokenizer = backend.tokenizer
        self.max_length = backend.max_length
        source = getattr(backend, "source", None)
        self.stats: RewardStats | None = load_stats(getattr(source, "home", source.path)) if source is not None else None
        self.ready = False
        self.accepting = True
        self.observer = metrics.ModelObserver(self.name)
        self.batcher = DynamicBatcher(
            backend.score_batch,
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_padding_ratio=config.max_padding_ratio,
            max_queue=config.max_queue,
            packed=bool(getattr(backend, "packed", False)),
            group_min_prefix=config.group_min_prefix if getattr(backend, "prefix_groups", False) else 0,
            observer=self.observer,
        )
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rewardserve-tokenize")

    @classmethod
    def from_config(cls, config: ServeConfig) -> "RewardEngine":
        from service.backends.registry import create_backend

        return cls(config, create_backend(config))

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.warmup:  # before the worker starts: still the only thread touching the model
            await asyncio.to_thread(self.backend.warmup)
        self.batcher.start()
        if self.config.warmup:  # and once through the whole path
            await self.score([{"prompt": "Hello", "response": "Hi! How can I help?"}] * 2)
        self.ready = True
        metrics.READY.labels(self.name).set(1)
        log.info("model %s ready (max_length=%d)", self.name, self.max_length)

    def mark_draining(self) -> None:
        """Readiness false and new work refused (UNAVAILABLE); what is queued still completes."""
        self.ready = False
        self.accepting = False
        metrics.READY.labels(self.name).set(0)

    async def stop(self) -> None:
        self.mark_draining()
        await asyncio.to_thread(self.batcher.stop)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    # ---- scoring -----------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model != self.name:
            raise RewardServeError(ErrorKind.NOT_FOUND, f"unknown model {model!r}; this server serves {self.name!r}")

    def _encode(self, inputs: Sequence[Any]) -> list[Encoded]:
        return [encode_input(self.tokenizer, inp, self.max_length) for inp in inputs]

    async def encode(self, inputs: Sequence[Any]) -> list[Encoded]:
        if len(inputs) < TOKENIZE_INLINE_MAX:
            return self._encode(inputs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._encode, inputs)

    def deadline_from_timeout(self, timeout_s: float | None) -> float | None:
        """An absolute (monotonic) deadline from a relative timeout; the configured default applies."""
        if timeout_s is None or timeout_s == 0:
            timeout_s = self.config.default_timeout_s or None
        if timeout_s is None:
            return None
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise invalid(f"timeout must be a positive number of seconds, got {timeout_s}")
        return time.monotonic() + timeout_s

    async def score(
        self,
        inputs: Sequence[Any],
        *,
        model: str | None = None,
        deadline: float | None = None,
        normalize: bool = False,
        admitted: bool = False,
    ) -> ScoreOutcome:
        """Score validated inputs (`service.schemas` models or plain dicts), in order.

        admitted: the caller's request was accepted before a drain began (e.g. a Best-of-N request whose candidates
        were being generated): it is answered, not refused, so that every accepted request gets its rewards.
        """
        if not self.accepting and not admitted:
            raise RewardServeError(ErrorKind.UNAVAILABLE, "the server is draining: send to another replica")
        self.check_model(model)
        if not inputs:
            raise invalid("inputs is empty: send at least one input")
        if len(inputs) > self.config.max_inputs_per_request:
            raise invalid(
                f"too many inputs: {len(inputs)} > max_inputs_per_request={self.config.max_inputs_per_request}"
            )
        if normalize and self.stats is None:
            raise invalid(f"model {self.name!r} has no reward statistics (reward_stats.json): cannot normalize")
        encoded = await self.encode(inputs)
        rewards, queue_s, compute_s = await self.score_ids([e.input_ids for e in encoded], deadline)
        if not all(math.isfinite(r) for r in rewards):
            raise RewardServeError(ErrorKind.BACKEND, "the model produced a non-finite reward (NaN or inf)")
        results = [
            ScoreResult(
                reward=r,
                truncated=e.truncated,
                tokens=e.tokens,
                normalized=self.stats.normalize(r) if normalize and self.stats else None,
            )
            for r, e in zip(rewards, encoded)
        ]
        metrics.observe_results(self.name, rewards, sum(e.truncated for e in encoded))
        return ScoreOutcome(self.name, results, queue_s, compute_s)

    async def score_ids(
        self, batch: Sequence[Sequence[int]], deadline: float | None = None
    ) -> tuple[list[float], float, float]:
        """Rewards for token-id lists, plus the longest queue wait and compute time among them."""
        if deadline is not None and deadline <= time.monotonic():
            raise RewardServeError(ErrorKind.DEADLINE, "deadline passed before the request was queued")
        items = self.batcher.submit(batch, deadline)
        waiter = asyncio.gather(*(item.future for item in items))
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            rewards = await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise RewardServeError(ErrorKind.DEADLINE, "deadline exceeded before scoring finished") from None
        finally:
            for item in items:  # caller went away or failed: let the worker skip what is left
                if not item.future.done():
                    item.future.cancel()
        return (
            list(rewards),
            max(item.queue_s for item in items),
            max(item.compute_s for item in items),
        )
