"""Properties of the batcher (hypothesis): the pure planner on any window, and the live batcher on any load.

plan_batches: every input lands in exactly one batch; no batch breaks a limit (count, token budget, padding)
unless it holds a single input; batches come shortest first; a batch is only cut where the next input would
break a limit (greedy, no needless small batches).
DynamicBatcher: whatever the request sizes and limits, every input gets its own value, none hangs, and the
queue depth returns to 0.
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import DynamicBatcher, WorkItem, plan_batches

LENGTHS = st.lists(st.integers(min_value=1, max_value=600), min_size=0, max_size=80)
LIMITS = st.tuples(
    st.integers(min_value=1, max_value=40),  # max_batch_size
    st.integers(min_value=1, max_value=5000),  # max_batch_tokens
    st.floats(min_value=0.0, max_value=1.0),  # max_padding_ratio
    st.booleans(),  # packed
)


def _items(lengths: list[int]) -> list[WorkItem]:
    loop = asyncio.new_event_loop()
    try:
        return [WorkItem([7] * n, loop.create_future(), loop) for n in lengths]
    finally:
        loop.close()


def _cost(batch: list[WorkItem], packed: bool) -> int:
    return sum(it.length for it in batch) if packed else max(it.length for it in batch) * len(batch)


def _waste(batch: list[WorkItem]) -> float:
    return 1.0 - sum(it.length for it in batch) / (max(it.length for it in batch) * len(batch))


def _fits(batch: list[WorkItem], limits: tuple) -> bool:
    size, tokens, ratio, packed = limits
    if len(batch) == 1:
        return True  # an input longer than the budget still runs, alone
    return len(batch) <= size and _cost(batch, packed) <= tokens and (packed or _waste(batch) <= ratio)


@settings(max_examples=300, deadline=None)
@given(lengths=LENGTHS, limits=LIMITS)
def test_plan_covers_every_input_once_within_the_limits(lengths, limits):
    items = _items(lengths)
    batches = plan_batches(items, *limits)
    flat = [it for batch in batches for it in batch]
    assert sorted(map(id, flat)) == sorted(map(id, items))  # each input exactly once
    assert all(batch for batch in batches)  # no empty batch
    assert all(_fits(batch, limits) for batch in batches)
    assert [it.length for it in flat] == sorted(lengths)  # length-sorted, shortest batches first


@settings(max_examples=300, deadline=None)
@given(lengths=LENGTHS, limits=LIMITS)
def test_plan_cuts_only_where_a_limit_forces_it(lengths, limits):
    batches = plan_batches(_items(lengths), *limits)
    for batch, following in itertools.pairwise(batches):
        assert not _fits(batch + following[:1], limits)


@settings(max_examples=300, deadline=None)
@given(lengths=LENGTHS, limits=LIMITS)
def test_plan_does_not_depend_on_arrival_order(lengths, limits):
    forward = plan_batches(_items(lengths), *limits)
    backward = plan_batches(_items(lengths[::-1]), *limits)
    assert [[it.length for it in b] for b in forward] == [[it.length for it in b] for b in backward]


REQUESTS = st.lists(
    st.lists(st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=40), min_size=1, max_size=6),
    min_size=1, max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=REQUESTS, limits=LIMITS, wait_ms=st.sampled_from([0.0, 0.5, 3.0]))
def test_live_batcher_answers_every_input_with_its_own_value(requests, limits, wait_ms):
    size, tokens, ratio, packed = limits
    batches: list[int] = []

    def compute(batch):
        batches.append(len(batch))
        return [float(sum(ids) * 1000 + len(ids)) for ids in batch]  # a value unique to the input's content

    async def run():
        batcher = DynamicBatcher(compute, max_batch_size=size, max_batch_tokens=tokens, max_wait_s=wait_ms / 1000,
                                 max_padding_ratio=ratio, max_queue=10_000, packed=packed)
        batcher.start()
        try:
            async def one(request):
                items = batcher.submit(request)
                return await asyncio.wait_for(asyncio.gather(*(it.future for it in items)), 10)

            results = await asyncio.gather(*(one(r) for r in requests))
            for _ in range(100):  # the worker frees queue room just before it posts the answers
                if batcher.depth == 0:
                    break
                await asyncio.sleep(0.001)
            return results, batcher.depth
        finally:
            await asyncio.to_thread(batcher.stop)

    results, depth = asyncio.run(run())
    for request, values in zip(requests, results):
        assert values == [float(sum(ids) * 1000 + len(ids)) for ids in request]
    assert depth == 0
    assert sum(batches) == sum(len(r) for r in requests)  # nothing computed twice, nothing skipped
    assert max(batches) <= max(size, 1)
