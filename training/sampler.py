"""Data order for the training loop: which items make up each micro-batch, for one epoch and one process.

Both orders are pure functions of (seed, epoch, item lengths), so the position in the data is just (epoch,
optimizer step within the epoch), which a checkpoint stores, and a resumed run replays the very same
micro-batches as a run that never stopped.

- random (`lengths=None`): the epoch's permutation `numpy.random.default_rng([seed, epoch])` cut into global
  micro-batches of batch_size x world consecutive items; process r takes slice r.
- length-grouped (`lengths` given): the same permutation cut into megabatches of `megabatch` global batches;
  each megabatch is sorted by length (longest first, ties in permutation order) and cut into global batches,
  so the items of a batch have similar lengths and padding each batch to its longest item wastes little.
  The order of the epoch's batches is then shuffled by the same generator, and the batch that holds the
  epoch's longest item goes first (a run that does not fit in memory fails at its first step, not hours in).
  Process r takes items r, r + world, ... of each global batch, so every process gets similar lengths (DDP
  waits for the slowest). Within a megabatch of 50 batches the data is still shuffled across the epoch.

In both orders one process keeps a short last batch, and several processes drop the incomplete last global
batch (the same items, the tail of the permutation, in both orders), so both give the same number of
micro-batches and `steps_per_epoch` does not depend on the order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MEGABATCH = 50  # global batches per length-sorted megabatch (as transformers' LengthGroupedSampler)


def micro_batches(
    num_items: int, batch_size: int, epoch: int, seed: int, world: int = 1, rank: int = 0,
    lengths: Sequence[int] | None = None, megabatch: int = MEGABATCH,
) -> list[list[int]]:
    """This process's micro-batches (lists of item indices) for one epoch, in a seeded order (see module doc)."""
    if lengths is not None and len(lengths) != num_items:
        raise ValueError(f"{len(lengths)} lengths for {num_items} items")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_items).tolist()
    span = batch_size * world
    count = math.ceil(num_items / span) if world == 1 else num_items // span
    if lengths is None:
        return [order[i * span + rank * batch_size : i * span + (rank + 1) * batch_size] for i in range(count)]
    batches = _length_grouped(order[: count * span] if world > 1 else order, lengths, span, megabatch, rng)
    return [batch[rank::world] for batch in batches]


def _length_grouped(
    order: list[int], lengths: Sequence[int], span: int, megabatch: int, rng: np.random.Generator
) -> list[list[int]]:
    """Global batches of `span` items: megabatches of the permutation sorted by length, then batch order shuffled."""
    size = span * megabatch
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        chunk = np.asarray(order[start : start + size], dtype=np.int64)  # (M,)
        keys = -np.asarray([lengths[i] for i in chunk], dtype=np.int64)  # longest first
        ranked = chunk[np.argsort(keys, kind="stable")].tolist()
        batches += [ranked[i : i + span] for i in range(0, len(ranked), span)]
    shuffled = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    first = max(range(len(shuffled)), key=lambda b: lengths[shuffled[b][0]])  # each batch is sorted: [0] is its longest
    return [shuffled[first], *shuffled[:first], *shuffled[first + 1 :]]


def item_lengths(collate: Any, items: Sequence) -> list[int] | None:
    """Per-item padded-cost lengths from a collator that offers `lengths(items)`; None when it does not."""
    measure = getattr(collate, "lengths", None)
    if measure is None:
        return None
    lengths = [int(n) for n in measure(items)]
    if len(lengths) != len(items):
        raise ValueError(f"the collator gave {len(lengths)} lengths for {len(items)} items")
    return lengths


def lengths_digest(lengths: Sequence[int] | None) -> str:
    """A short fingerprint of the lengths the order was built from ('' for the random order): a resume checks it."""
    if lengths is None:
        return ""
    return hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()[:16]
