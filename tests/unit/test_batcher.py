"""DynamicBatcher: batch cutting, coalescing, drops, deadlines, failures, admission."""

import asyncio
import threading
import time

import pytest

from service.batcher import DynamicBatcher, WorkItem, plan_batches
from service.errors import ErrorKind, RewardServeError


def _items(lengths):
    loop = asyncio.new_event_loop()
    try:
        return [WorkItem(list(range(n)), loop.create_future(), loop) for n in lengths]
    finally:
        loop.close()


def test_plan_sorts_and_respects_count_budget_and_padding():
    items = _items([100, 10, 12, 11, 95, 400])
    batches = plan_batches(items, max_batch_size=2, max_batch_tokens=10_000, max_padding_ratio=0.25)
    assert [[it.length for it in b] for b in batches] == [[10, 11], [12], [95, 100], [400]]
    # padding ratio: 10 and 100 never share a batch
    batches = plan_batches(_items([10, 100]), 8, 10_000, 0.25)
    assert [[it.length for it in b] for b in batches] == [[10], [100]]
    # token budget: longest x count <= budget, but one input longer than the budget still runs alone
    batches = plan_batches(_items([50] * 5 + [300]), 8, 150, 1.0)
    assert [[it.length for it in b] for b in batches] == [[50, 50, 50], [50, 50], [300]]


def test_plan_packed_counts_real_tokens_and_ignores_padding():
    batches = plan_batches(_items([10, 100, 20, 300]), 8, 400, 0.0, packed=True)
    assert [[it.length for it in b] for b in batches] == [[10, 20, 100], [300]]


def test_plan_keeps_every_item_once():
    lengths = [7, 3, 3, 90, 1, 500, 64, 65, 66, 2]
    items = _items(lengths)
    batches = plan_batches(items, 3, 300, 0.3)
    flat = [it for b in batches for it in b]
    assert sorted(map(id, flat)) == sorted(map(id, items))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(i.length for i in b) * len(b) <= 300


class Recorder:
    """A compute function that records batch sizes and can be slowed down or made to fail."""

    def __init__(self, delay=0.0, fail=False):
        self.delay, self.fail = delay, fail
        self.batches: list[list[int]] = []
        self.thread_names: set[str] = set()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, batch):
        self.release.wait(10)
        self.thread_names.add(threading.current_thread().name)
        self.batches.append([len(ids) for ids in batch])
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return [float(sum(ids)) for ids in batch]


async def _run(batcher, batch, deadline=None):
    items = batcher.submit(batch, deadline)
    return await asyncio.gather(*(it.future for it in items))


async def test_concurrent_requests_coalesce_into_one_forward():
    rec = Recorder()
    rec.release.clear()  # hold the worker so that all requests queue up
    b = DynamicBatcher(rec, max_batch_size=64, max_wait_s=0.05, max_padding_ratio=1.0)
    b.start()
    try:
        tasks = [asyncio.ensure_future(_run(b, [[i] * 5])) for i in range(16)]
        await asyncio.sleep(0.05)
        rec.release.set()
        results = await asyncio.gather(*tasks)
        assert [r[0] for r in results] == [float(i * 5) for i in range(16)]
        assert max(len(x) for x in rec.batches) > 1  # real coalescing
        assert sum(len(x) for x in rec.batches) == 16
        assert rec.thread_names == {"rewardserve-batcher"}  # one worker thread owns the model
    finally:
        b.stop()


async def test_failed_batch_fails_every_waiter_with_a_typed_error():
    b = DynamicBatcher(Recorder(fail=True), max_wait_s=0.01)
    b.start()
    try:
        results = await asyncio.gather(*(_run(b, [[1, 2], [3]]) for _ in range(4)), return_exceptions=True)
        assert len(results) == 4
        for r in results:
            assert isinstance(r, RewardServeError) and r.kind == ErrorKind.BACKEND and "boom" in r.message
        for _ in range(200):  # the other batch of the window may still be failing
            if b.depth == 0:
                break
            await asyncio.sleep(0.01)
        assert b.depth == 0
    finally:
        b.stop()


async def test_an_input_that_gives_nan_does_not_spoil_the_others_in_its_pass():
    """Fault injection: any pass holding token 666 answers NaN for every input (as a NaN value leaks through an
    attention weight of zero). The others are computed again alone and answered; only the culprit stays NaN."""
    calls: list[int] = []
    release = threading.Event()

    def compute(batch):
        release.wait(10)
        calls.append(len(batch))
        return [float("nan") if any(666 in ids for ids in batch) else float(sum(ids)) for ids in batch]

    b = DynamicBatcher(compute, max_batch_size=16, max_wait_s=0.05, max_padding_ratio=1.0)
    b.start()
    try:
        first = b.submit([[7]])  # occupies the worker: what comes next queues up into one pass
        await asyncio.sleep(0.05)
        tasks = [asyncio.ensure_future(_run(b, [ids])) for ids in ([1, 2], [666], [3], [4, 5])]
        await asyncio.sleep(0.05)
        release.set()
        assert await first[0].future == 7.0
        results = [r[0] for r in await asyncio.gather(*tasks)]
        assert results[0] == 3.0 and results[2] == 3.0 and results[3] == 9.0
        assert results[1] != results[1]  # NaN: the engine names it
        assert calls == [1, 4, 1, 1, 1, 1]  # the pass, then each NaN input alone
        assert b.depth == 0
    finally:
        b.stop()


async def test_a_nan_input_whose_deadline_passed_in_its_pass_is_dropped_not_computed_again():
    """The recompute alone checks its caller first, and queue wait is observed once per input."""
    waits: list[float] = []
    dropped: list[str] = []

    class Observer:
        def on_batch(self, *args): pass
        def on_queue_wait(self, seconds): waits.append(seconds)
        def on_dropped(self, reason): dropped.append(reason)
        def on_depth(self, depth): pass
        def on_groups(self, *args): pass

    calls: list[int] = []

    def compute(batch):
        calls.append(len(batch))
        time.sleep(0.3)  # the pass outlasts the NaN input's deadline
        return [float("nan") if 666 in ids else 1.0 for ids in batch]

    b = DynamicBatcher(compute, max_batch_size=16, max_wait_s=0.05, max_padding_ratio=1.0, observer=Observer())
    b.start()
    try:
        short, other = b.submit([[666], [1, 2]], deadline=time.monotonic() + 0.1)  # one pass, whatever the timing
        assert await other.future == 1.0  # finished in the pass: its deadline no longer matters
        with pytest.raises(RewardServeError) as err:
            await short.future
        assert err.value.kind == ErrorKind.DEADLINE
        assert calls == [2] and dropped == ["deadline"] and len(waits) == 2 and b.depth == 0
    finally:
        b.stop()


async def test_cancelled_and_expired_inputs_are_dropped_before_compute():
    rec = Recorder()
    rec.release.clear()
    b = DynamicBatcher(rec, max_batch_size=1, max_wait_s=0.0)
    b.start()
    try:
        first = b.submit([[1]])  # occupies the worker
        await asyncio.sleep(0.05)
        gone = b.submit([[2, 2]])
        expired = b.submit([[3, 3, 3]], deadline=time.monotonic() + 0.01)
        kept = b.submit([[4, 4, 4, 4]])
        gone[0].future.cancel()
        await asyncio.sleep(0.05)
        rec.release.set()
        assert await first[0].future == 1.0
        with pytest.raises(RewardServeError) as err:
            await expired[0].future
        assert err.value.kind == ErrorKind.DEADLINE
        assert await kept[0].future == 16.0
        assert [1] in rec.batches and [4] in rec.batches
        assert [2] not in rec.batches and [3] not in rec.batches
    finally:
        b.stop()


async def test_full_queue_refuses_at_once():
    rec = Recorder()
    rec.release.clear()
    b = DynamicBatcher(rec, max_queue=3, max_wait_s=0.0)
    b.start()
    try:
        held = b.submit([[1], [1], [1]])
        start = time.monotonic()
        with pytest.raises(RewardServeError) as err:
            b.submit([[1]])
        assert err.value.kind == ErrorKind.OVERLOADED
        assert time.monotonic() - start < 0.1
        rec.release.set()
        assert await asyncio.gather(*(i.future for i in held)) == [1.0, 1.0, 1.0]
        assert await _run(b, [[2]]) == [2.0]  # capacity is back
    finally:
        b.stop()


async def test_stop_drains_what_was_accepted_then_refuses():
    rec = Recorder(delay=0.01)
    b = DynamicBatcher(rec, max_batch_size=2, max_wait_s=0.0)
    b.start()
    items = b.submit([[i] for i in range(10)])
    await asyncio.to_thread(b.stop)
    assert [await i.future for i in items] == [float(i) for i in range(10)]
    with pytest.raises(RewardServeError) as err:
        b.submit([[1]])
    assert err.value.kind == ErrorKind.UNAVAILABLE


async def test_a_lone_request_on_an_idle_worker_does_not_wait_for_company():
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_size=64, max_wait_s=30.0)  # were it to wait, the timeout below would fire
    b.start()
    try:
        for _ in range(2):  # the first request ever, and one after the worker has been idle for a minute
            before = b._idle_since
            assert await asyncio.wait_for(_run(b, [[1, 1], [2]]), timeout=10) == [2.0, 2.0]
            for _ in range(1000):  # the worker marks itself idle just after it answers: let it, then age it
                if b._idle_since != before:
                    break
                await asyncio.sleep(0.005)
            b._idle_since = time.monotonic() - 60
        assert rec.batches == [[2, 1], [2, 1]] or rec.batches == [[1, 2], [1, 2]]
    finally:
        b.stop()


async def test_under_load_the_oldest_input_waits_for_company():
    """Inputs arriving while the worker computes, or within max_wait of its last answer, share a window."""
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_size=64, max_wait_s=0.3, max_padding_ratio=1.0)
    b.start()
    try:
        first = asyncio.ensure_future(_run(b, [[1]]))
        await first  # the worker has just finished: a caller's next request and a second caller's come now
        tasks = [asyncio.ensure_future(_run(b, [[i]])) for i in (2, 3)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.ensure_future(_run(b, [[4]])))
        await asyncio.gather(*tasks)
        assert rec.batches[1:] == [[1, 1, 1]]
    finally:
        b.stop()


async def test_max_wait_bounds_latency_of_a_lone_request():
    b = DynamicBatcher(Recorder(), max_batch_size=64, max_wait_s=0.02)
    b.start()
    try:
        start = time.monotonic()
        assert await _run(b, [[1, 1]]) == [2.0]
        assert time.monotonic() - start < 1.0
    finally:
        b.stop()
