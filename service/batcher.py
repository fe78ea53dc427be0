"""DynamicBatcher: one queue for every request of every transport, one worker thread that owns the model.

Schedule -> execute -> update:
- the event loop `submit`s token-id lists and gets one asyncio future per input (admission is bounded:
  a full queue raises OVERLOADED at once);
- the worker thread takes a window of queued inputs (after waiting at most `max_wait_s` for the oldest one
  to get company), drops those whose caller went away or whose deadline passed, sorts the rest by length and
  cuts them into batches by count, token budget (padded cost = longest x count) and padding ratio;
- with `group_min_prefix` > 0 (packed decoder backends), inputs of the window that share at least that many
  leading tokens, from one request or several (a prompt's N candidates, GRPO groups), are planned as prefix
  groups (service/grouping.py): the backend gets a `PlannedBatch` and computes each shared prefix once;
- each batch is computed by the backend and every future is resolved on its own loop. A batch that fails is
  retried input by input, so that only an input that fails on its own gets the error (one client's input can
  never fail another client's request); no caller ever hangs.

Queue room is reserved before a request costs anything (`reserve`, at admission: before tokenizing, before a
Best-of-N request generates), so overload is refused at once and the drain sees every request in the house.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from service.errors import ErrorKind, RewardServeError
from service.grouping import BatchResult, Group, PlannedBatch, plan_grouped_batches, restrict

log = logging.getLogger("rewardserve.batcher")


@dataclass(eq=False)
class WorkItem:
    ids: Sequence[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() value
    reads: tuple[int, ...] | None = None  # positions whose outputs are read (None: the last token)
    enqueued: float = field(default_factory=time.monotonic)
    queue_s: float = 0.0
    compute_s: float = 0.0
    computed_at: float = 0.0  # the start of the forward pass that computed it (one value per pass)
    finished: bool = False  # answered or dropped: no longer counted in the queue depth
    waited: bool = False  # its queue wait is observed (once: a recomputation alone is not waiting)

    @property
    def length(self) -> int:
        return len(self.ids)


def _finite(values: Any) -> bool:
    """Whether a backend's output for one input (a number or an array of them) is all finite."""
    try:
        return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())
    except (TypeError, ValueError):
        return True  # not numbers: not this check's business


class BatchObserver(Protocol):
    def on_batch(self, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None: ...
    def on_queue_wait(self, seconds: float) -> None: ...
    def on_dropped(self, reason: str) -> None: ...
    def on_depth(self, depth: int) -> None: ...
    def on_groups(self, inputs: int, saved_tokens: int) -> None: ...


class _NullObserver:
    def on_batch(self, size, padded_tokens, real_tokens, seconds):  # noqa: D102
        pass

    def on_queue_wait(self, seconds):  # noqa: D102
        pass

    def on_dropped(self, reason):  # noqa: D102
        pass

    def on_depth(self, depth):  # noqa: D102
        pass

    def on_groups(self, inputs, saved_tokens):  # noqa: D102
        pass


def plan_batches(
    items: list[WorkItem],
    max_batch_size: int,
    max_batch_tokens: int,
    max_padding_ratio: float,
    packed: bool = False,
) -> list[list[WorkItem]]:
    """Sort by length and cut greedily; shortest batches first. Pure: tested on its own.

    Padded batches cost longest x count and are also cut where padding would pass `max_padding_ratio`;
    packed batches cost their real tokens and carry no padding.
    """
    batches: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    real = 0
    for item in sorted(items, key=lambda it: it.length):
        if current:
            longest = item.length  # sorted ascending: the newcomer is the longest
            padded = longest * (len(current) + 1)
            cost = real + item.length if packed else padded
            waste = 0.0 if packed else 1.0 - (real + item.length) / padded
            if len(current) >= max_batch_size or cost > max_batch_tokens or waste > max_padding_ratio:
                batches.append(current)
                current, real = [], 0
        current.append(item)
        real += item.length
    if current:
        batches.append(current)
    return batches


def _resolve(future: asyncio.Future, value: float | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _post(item: WorkItem, value: float | None, error: BaseException | None = None) -> None:
    """Resolve an item's future on its own loop (thread-safe); a closed loop means nobody waits."""
    try:
        item.loop.call_soon_threadsafe(_resolve, item.future, value, error)
    except RuntimeError:
        pass


class Reservation:
    """Room for `count` inputs in the queue, taken at admission. `submit` uses it; `release` (idempotent, also as
    a context manager's exit) gives back what was not used."""

    def __init__(self, batcher: "DynamicBatcher", count: int):
        self._batcher = batcher
        self.count = count

    def take(self, n: int) -> None:
        if n > self.count:
            raise RuntimeError(f"submitting {n} inputs on a reservation of {self.count}")
        self.count -= n

    def release(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self._batcher._unreserve(count)

    def absorb(self, other: "Reservation") -> None:
        """Take over another reservation's room in the same queue (one submission for both)."""
        if other._batcher is not self._batcher:
            raise ValueError("reservations of different queues cannot be merged")
        self.count, other.count = self.count + other.count, 0

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DynamicBatcher:
    def __init__(
        self,
        compute: Callable[[list[Sequence[int]]], list[float]],
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.002,
        max_padding_ratio: float = 0.25,
        max_queue: int = 2048,
        packed: bool = False,
        group_min_prefix: int = 0,
        observer: BatchObserver | None = None,
        name: str = "rewardserve-batcher",
    ):
        self._compute = compute
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_padding_ratio = max_padding_ratio
        self.max_queue = max_queue
        self.max_window = max_batch_size * 4
        self.packed = packed
        self.group_min_prefix = group_min_prefix if packed else 0
        self._observer = observer or _NullObserver()
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._pending = 0  # queued + being computed
        self._idle_since = float("-inf")  # when the worker last finished a window (monotonic)
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._pending

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def reserve(self, count: int) -> Reservation:
        """Room for `count` inputs, or OVERLOADED at once (INVALID_ARGUMENT if the whole queue is smaller)."""
        with self._cond:
            if not self._running:
                raise RewardServeError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            if count > self.max_queue:
                raise RewardServeError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"request has {count} inputs, more than the whole queue holds (max_queue={self.max_queue})",
                )
            if self._pending + count > self.max_queue:
                raise RewardServeError(
                    ErrorKind.OVERLOADED,
                    f"queue full ({self._pending} inputs waiting, limit {self.max_queue}); retry later",
                )
            self._pending += count
            self._observer.on_depth(self._pending)  # under the lock: sets from two threads land in order
        return Reservation(self, count)

    def _unreserve(self, count: int) -> None:
        with self._cond:
            self._pending -= count
            self._observer.on_depth(self._pending)

    def submit(self, batch: Sequence[Sequence[int]], deadline: float | None = None,
               reservation: Reservation | None = None,
               reads: Sequence[tuple[int, ...] | None] | None = None) -> list[WorkItem]:
        """Queue inputs on their reservation (taken now if none is given); returns their work items (await
        `item.future`: the backend's values for that input). `reads`: per input, the positions to read (None:
        its last token). Raises OVERLOADED when full."""
        if reservation is None:
            reservation = self.reserve(len(batch))
        reservation.take(len(batch))
        loop = asyncio.get_running_loop()
        reads = reads if reads is not None else [None] * len(batch)
        items = [WorkItem(ids, loop.create_future(), loop, deadline, r) for ids, r in zip(batch, reads)]
        with self._cond:
            if not self._running:
                self._pending -= len(items)
                raise RewardServeError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            self._queue.extend(items)
            self._cond.notify()
        return items

    def withdraw(self, items: Sequence[WorkItem], reason: str = "cancelled") -> None:
        """Take a departed caller's inputs out of the queue now (event-loop side): their room is free at once, not
        when the worker next reaches them (a forward pass later, while other clients were refused OVERLOADED).
        Inputs the worker has already taken are left to it. `reason`: the dropped-inputs metric's."""
        gone = {id(item) for item in items if not item.finished}
        if not gone:
            return
        with self._cond:
            removed = [item for item in self._queue if id(item) in gone]
            if not removed:
                return
            self._queue = deque(item for item in self._queue if id(item) not in gone)
            for item in removed:
                item.finished = True
            self._pending -= len(removed)
            self._observer.on_depth(self._pending)
        for _ in removed:
            self._observer.on_dropped(reason)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish everything queued, then stop the worker."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- worker side -----------------------------------------------------------------------------------
    def _take_window(self) -> list[WorkItem] | None:
        with self._cond:
            while True:
                while not self._queue and self._running:
                    self._cond.wait()
                if not self._queue:
                    return None  # stopped and drained
                oldest = self._queue[0].enqueued
                # Waiting for company pays only under load: an input that found the worker idle for longer than
                # max_wait (a lone caller, an RL step's first request) is computed at once; under load, answers
                # and the callers' next requests come within max_wait of each other and windows form as before.
                lone = oldest - self._idle_since >= self.max_wait_s
                while len(self._queue) < self.max_batch_size and self._running and not lone:
                    remaining = oldest + self.max_wait_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                n = min(len(self._queue), self.max_window)
                if n:  # else everything waiting was withdrawn meanwhile
                    return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            window = self._take_window()
            if window is None:
                return
            try:
                self._process(window)
            except BaseException as exc:  # never let the worker die with callers waiting
                log.exception("batcher window failed")
                self._finish(window, error=RewardServeError(ErrorKind.BACKEND, f"internal error: {exc}"))
            finally:
                self._idle_since = time.monotonic()

    def _finish(
        self, items: list[WorkItem], values: list[Any] | None = None, error: BaseException | None = None
    ) -> None:
        """Answer (or drop, with values=None and error=None) items not yet finished; frees queue room first."""
        todo = [(i, item) for i, item in enumerate(items) if not item.finished]
        for _, item in todo:
            item.finished = True
        with self._cond:
            self._pending -= len(todo)
            self._observer.on_depth(self._pending)
        for i, item in todo:
            if values is not None:
                _post(item, values[i])
            elif error is not None:
                _post(item, None, error)

    def _live(self, items: list[WorkItem]) -> list[WorkItem]:
        """Drop inputs whose caller went away; fail those past their deadline."""
        now = time.monotonic()
        live, gone, expired = [], [], []
        for item in items:
            past = item.deadline is not None and now >= item.deadline
            if item.future.done():
                gone.append(item)
            elif past:
                expired.append(item)
            else:
                live.append(item)
            if item.future.done() or past:  # a caller that gave up at its deadline (the engine cancels then)
                self._observer.on_dropped("deadline" if past else "cancelled")  # missed it: "deadline"
        self._finish(gone)
        self._finish(expired, error=RewardServeError(ErrorKind.DEADLINE, "deadline passed while queued"))
        return live

    def _plan(self, items: list[WorkItem]) -> list[tuple[list[WorkItem], tuple[Group, ...]]]:
        if self.group_min_prefix > 0:
            return plan_grouped_batches(items, self.max_batch_size, self.max_batch_tokens, self.group_min_prefix)
        batches = plan_batches(items, self.max_batch_size, self.max_batch_tokens, self.max_padding_ratio, self.packed)
        return [(batch, ()) for batch in batches]

    def _process(self, window: list[WorkItem]) -> None:
        for planned, groups in self._plan(self._live(window)):
            batch = self._live(planned)
            if len(batch) < len(planned) and groups:
                kept = set(map(id, batch))
                groups = restrict(groups, [i for i, item in enumerate(planned) if id(item) in kept])
            if batch:
                self._run_batch(batch, groups)

    def _compute_planned(self, planned: PlannedBatch) -> BatchResult:
        result = self._compute(planned)
        if not isinstance(result, BatchResult):  # a backend may return the values alone
            result = BatchResult(list(result))
        if len(result.values) != len(planned):
            raise RuntimeError(f"backend returned {len(result.values)} values for {len(planned)} inputs")
        return result

    def _run_alone(self, item: WorkItem) -> None:
        """Compute one input of a pass again on its own, unless its caller has gone or its deadline passed
        meanwhile (then it is dropped and counted, as a queued one would be)."""
        if self._live([item]):
            self._run_batch([item])

    def _run_batch(self, batch: list[WorkItem], groups: tuple[Group, ...] = ()) -> None:
        start = time.monotonic()
        for item in batch:
            if not item.waited:  # once per input: a recomputation alone (below) is not more waiting
                item.waited = True
                item.queue_s = start - item.enqueued
                self._observer.on_queue_wait(item.queue_s)
        planned = PlannedBatch((item.ids for item in batch), groups, self.group_min_prefix,
                               reads=[item.reads for item in batch])
        try:
            result = self._compute_planned(planned)
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            if len(batch) > 1:  # find the input that fails: each one alone, so the others still get their rewards
                for item in batch:
                    self._run_alone(item)
                return
            error = RewardServeError(ErrorKind.BACKEND, f"scoring failed: {type(exc).__name__}: {exc}")
            self._finish(batch, error=error)
            return
        seconds = time.monotonic() - start
        real = sum(item.length for item in batch)
        cost = real if self.packed else max(item.length for item in batch) * len(batch)
        saved = result.saved_tokens if result.saved_tokens is not None else planned.saved_tokens
        if saved:
            cost = real = real - saved  # the tokens computed: padding-free, shared prefixes once
            shared = result.shared_inputs if result.shared_inputs is not None else planned.shared_inputs
            self._observer.on_groups(shared, saved)
        self._observer.on_batch(len(batch), cost, real, seconds)
        for item in batch:
            item.compute_s, item.computed_at = seconds, start
        broken = [i for i, v in enumerate(result.values) if not _finite(v)]
        if broken and len(batch) > 1:
            # An input that makes the model produce NaN/inf can spoil what shares its pass (a NaN key or value
            # times an attention weight of exactly zero is still NaN): the others are answered, and each input
            # with a non-finite output is computed again alone (same bits as in the pass when it is finite).
            log.warning("a pass of %d inputs gave %d non-finite outputs: computing each of those alone",
                        len(batch), len(broken))
            skip = set(broken)
            self._finish([item for i, item in enumerate(batch) if i not in skip],
                         [v for i, v in enumerate(result.values) if i not in skip])
            for i in broken:
                self._run_alone(batch[i])
            return
        self._finish(batch, result.values)
