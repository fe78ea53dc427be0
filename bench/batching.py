"""Packed batches as the batcher fills them, for the offline benches (standard library only: bench/gpu_check.py
imports it on machines without the service's dependencies)."""

from __future__ import annotations

from typing import Sequence


def packed_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices, shortest first, cut into batches of at most `budget` tokens each (a longer input rides alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = [[]]
    used = 0
    for i in order:
        if out[-1] and used + lengths[i] > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += lengths[i]
    return [b for b in out if b]
