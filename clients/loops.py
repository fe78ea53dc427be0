"""What a client holds per process and per event loop.

Connections do not cross a fork: a child that used its parent's pooled keep-alive socket would read other
processes' answers, so a client that finds itself in a new process (`os.getpid()` changed) opens its own
(`ProcessCheck`). An asyncio connection belongs to the event loop that opened it: `PerLoop` opens one per
loop and closes it when that loop shuts down (`asyncio.run` closes a loop's async generators before closing
the loop: a small generator held per loop runs the closing), so an asyncio client works across `asyncio.run`
calls and leaves nothing open behind a finished loop (a gRPC aio channel left open there breaks a later fork).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")

_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # one held by another thread at fork time would never be released in the child


os.register_at_fork(after_in_child=_after_fork)


class ProcessCheck:
    """`changed()` is True once in each new process (then False again there)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def changed(self) -> bool:
        if self.pid == os.getpid():
            return False
        with _lock:
            if self.pid == os.getpid():  # another thread of this process saw it first
                return False
            self.pid = os.getpid()
            return True


class _Held(Generic[T]):
    """One loop's resource and the async generator that closes it when the loop shuts down."""

    def __init__(self, resource: T, close: Callable[[T], Awaitable[None]]):
        self.resource = resource
        self.close = close
        self.dropped = False  # set: the generator's end closes nothing (the loop is gone, or another process)
        self.closer: Any = None

    async def closing(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            resource, self.resource = self.resource, None  # unreferenced: gRPC aio stops its poller thread
            if not self.dropped:
                self.dropped = True
                await self.close(resource)

    def drop(self) -> None:
        """End the generator without closing the resource (no loop needed): the loop will not call it."""
        self.dropped = True
        self.resource = None
        if self.closer is not None:
            try:
                self.closer.aclose().send(None)
            except (StopIteration, RuntimeError):
                pass


class PerLoop(Generic[T]):
    """One `open()`ed resource per running event loop (and process), closed with `close(resource)` when the loop
    shuts down (asyncio.run) or by `aclose()`."""

    def __init__(self, open: Callable[[], T], close: Callable[[T], Awaitable[None]]):
        self._open = open
        self._close = close
        self._process = ProcessCheck()
        self._held: dict[Any, _Held[T]] = {}

    async def get(self) -> T:
        loop = asyncio.get_running_loop()
        if self._process.changed():  # the parent's connections: never touched here
            self._drop_all()
        for other in [k for k in self._held if k.is_closed()]:  # a loop closed without its shutdown hooks
            self._held.pop(other).drop()
        held = self._held.get(loop)
        if held is None or held.dropped:
            held = self._held[loop] = _Held(self._open(), self._close)
            held.closer = held.closing()
            await held.closer.asend(None)  # started: the loop now knows it, and closes it at shutdown
        return held.resource

    async def aclose(self) -> None:
        """Close the running loop's resource; forget the others (another loop's cannot be closed from here)."""
        try:
            loop: Any = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        held = self._held.pop(loop, None) if loop is not None and self._process.pid == os.getpid() else None
        self._drop_all()
        if held is not None and not held.dropped:
            resource = held.resource
            held.drop()
            await self._close(resource)

    def _drop_all(self) -> None:
        held, self._held = list(self._held.values()), {}
        for item in held:
            item.drop()
