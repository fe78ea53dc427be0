"""Retries, deadlines and endpoint choice, shared by every client (no I/O here but sleeping).

One call = attempts until one succeeds. An attempt that fails with:
- an error whose `retry` is NEVER (bad input, deadline passed, server bug) ends the call at once;
- FAILOVER (no connection, draining, gateway error): the endpoint sits out `cooldown_s`; the next attempt
  goes to the next endpoint that is up, at once and without counting as a retry (at most endpoints - 1
  such free failovers per call); when none is up it counts as a retry, like BACKOFF;
- BACKOFF (overloaded): wait uniform(0, min(cap, base * 2**retry)) ("full jitter") and try again.
A busy or restarting server is waited for as long as the call's deadline allows: a pause that would end after
the deadline is cut to half the time left, and retries go on until under 2 * MIN_RETRY_S is left (the last
error is then raised). `max_retries` (None by default) caps their number too; a call without a deadline
(timeout=None) makes at most MAX_RETRIES_WITHOUT_DEADLINE retries unless `max_retries` says otherwise. Every
scoring request is idempotent, so resending one is always safe.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence, TypeVar

from .errors import FAILOVER, NEVER, DeadlineExceededError, RewardClientError

T = TypeVar("T")
MIN_TIMEOUT_S = 0.001  # below this there is no time left to send a request
MIN_RETRY_S = 0.05
"""A retry is made only with at least twice this many seconds left before the deadline."""
MAX_RETRIES_WITHOUT_DEADLINE = 10
"""Retries of a call without a deadline when `max_retries` is None (about 15 s of pauses with the default backoff)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int | None = None
    """Most retries of one call after its first attempt (free failovers not counted); None: as many as the
    call's deadline allows (MAX_RETRIES_WITHOUT_DEADLINE for a call without one)."""
    backoff_base: float = 0.1
    """Seconds: the pause before retry n is uniform(0, min(backoff_cap, backoff_base * 2**n))."""
    backoff_cap: float = 5.0
    """Longest pause between two attempts, in seconds."""
    cooldown_s: float = 5.0
    """How long an endpoint that failed to answer is skipped (while another is up)."""

    def backoff(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** min(retry, 64)))

    def retry_limit(self, deadline: "Deadline") -> int | None:
        """Most retries for a call with this deadline (None: until the deadline)."""
        if self.max_retries is not None:
            return self.max_retries
        return MAX_RETRIES_WITHOUT_DEADLINE if deadline.at is None else None


class Deadline:
    """The end of a call's time budget on the monotonic clock; no timeout: no deadline."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        self.timeout = timeout
        self.clock = clock
        self.at = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - self.clock()


class EndpointPool:
    """Round-robin over endpoints, skipping those in cool-down (all down: the one back soonest)."""

    def __init__(self, endpoints: str | Sequence[str], cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("give at least one endpoint")
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._next = 0
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()  # sync clients may be shared by threads

    def after_fork(self) -> None:
        """In a forked child: a lock another thread of the parent held at fork time would never be released."""
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            now = self.clock()
            count = len(self.endpoints)
            order = [(self._next + k) % count for k in range(count)]
            up = [i for i in order if self._down_until.get(self.endpoints[i], 0.0) <= now]
            index = up[0] if up else min(order, key=lambda i: self._down_until[self.endpoints[i]])
            self._next = (index + 1) % count
            return self.endpoints[index]

    def mark_down(self, endpoint: str) -> None:
        with self._lock:
            self._down_until[endpoint] = self.clock() + self.cooldown_s

    def mark_up(self, endpoint: str) -> None:
        with self._lock:
            self._down_until.pop(endpoint, None)

    def any_up(self) -> bool:
        now = self.clock()
        return any(self._down_until.get(e, 0.0) <= now for e in self.endpoints)


class Attempts:
    """The retry decisions of one call: where the next attempt goes, and whether and how long to wait."""

    def __init__(self, pool: EndpointPool, policy: RetryPolicy, deadline: Deadline, rng: random.Random):
        self.pool, self.policy, self.deadline, self.rng = pool, policy, deadline, rng
        self.free_failovers = len(pool.endpoints) - 1
        self.retries = 0
        self.sent = 0
        self.last: RewardClientError | None = None

    def next(self) -> tuple[str, float | None]:
        """The endpoint for the next attempt and the seconds left (None: no deadline)."""
        remaining = self.deadline.remaining()
        if remaining is not None and remaining < MIN_TIMEOUT_S:
            raise self._expired()
        self.sent += 1
        return self.pool.pick(), remaining

    def succeeded(self, endpoint: str) -> None:
        self.pool.mark_up(endpoint)

    def failed(self, endpoint: str, exc: RewardClientError) -> float:
        """Seconds to wait before the next attempt; raises `exc` when the call must not go on."""
        exc.attempts = self.sent
        self.last = exc
        if exc.retry == NEVER:
            raise exc
        if exc.retry == FAILOVER:
            self.pool.mark_down(endpoint)
            if self.free_failovers > 0 and self.pool.any_up():
                self.free_failovers -= 1
                return 0.0
        limit = self.policy.retry_limit(self.deadline)
        if limit is not None and self.retries >= limit:
            raise exc
        delay = self.policy.backoff(self.retries, self.rng)
        self.retries += 1
        remaining = self.deadline.remaining()
        if remaining is not None:
            if remaining < 2 * MIN_RETRY_S:  # no time left for another attempt
                raise exc
            delay = min(delay, remaining / 2)  # the last pauses shrink: the call tries until its deadline
        return delay

    def _expired(self) -> DeadlineExceededError:
        last = f"; last error: {self.last}" if self.last else ""
        exc = DeadlineExceededError(f"timeout of {self.deadline.timeout}s passed after {self.sent} attempt(s){last}",
                                    type="deadline_exceeded", endpoint=self.last.endpoint if self.last else None)
        exc.attempts = self.sent
        return exc


def call_with_retries(pool: EndpointPool, policy: RetryPolicy, deadline: Deadline, rng: random.Random,
                      send: Callable[[str, float | None], T]) -> T:
    """Run `send(endpoint, seconds_left)` until it returns, by the rules above (blocking pauses)."""
    attempts = Attempts(pool, policy, deadline, rng)
    while True:
        endpoint, remaining = attempts.next()
        try:
            result = send(endpoint, remaining)
        except RewardClientError as exc:
            time.sleep(attempts.failed(endpoint, exc))
            continue
        attempts.succeeded(endpoint)
        return result


async def acall_with_retries(pool: EndpointPool, policy: RetryPolicy, deadline: Deadline, rng: random.Random,
                             send: Callable[[str, float | None], Awaitable[T]]) -> T:
    """`call_with_retries` for coroutines (pauses with asyncio.sleep)."""
    attempts = Attempts(pool, policy, deadline, rng)
    while True:
        endpoint, remaining = attempts.next()
        try:
            result = await send(endpoint, remaining)
        except RewardClientError as exc:
            await asyncio.sleep(attempts.failed(endpoint, exc))
            continue
        attempts.succeeded(endpoint)
        return result
