"""The small interface every scoring backend implements. Only the batcher's worker thread calls it."""

from __future__ import annotations

from typing import Any, Protocol

from service.grouping import BatchResult, PlannedBatch


class Backend(Protocol):
    name: str
    """The model's served name."""
    tokenizer: Any
    """The model's tokenizer (used by the engine to render and encode; never reconfigured)."""
    max_length: int
    """Longest input in tokens."""
    packed: bool
    """True when a batch costs its real tokens (padding-free), False when it is padded to its longest."""
    prefix_groups: bool
    """True when the backend computes shared prefixes once: the batcher then plans prefix groups and passes
    them as `batch.groups`."""

    def score_batch(self, batch: PlannedBatch) -> BatchResult:
        """Raw rewards for one pass's token-id lists, in order. Runs on the worker thread only. The batch's
        `groups` and `layout` are a plan the backend may use or ignore: the rewards must be the same."""

    def warmup(self) -> None:
        """A few forward passes so the first request does not pay for lazy initialisation."""

    def close(self) -> None:
        """Free the model."""
