"""ScoreStream: one bidirectional call, each request answered as soon as its batch completes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import grpc

from protos import reward_pb2
from service.error_map import GRPC_STATUS
from service.errors import ErrorKind, RewardServeError
from service.grpc_api.calls import Observed, abort, typed
from service.grpc_api.codecs import encode_error, encode_outcome, engine_deadline

log = logging.getLogger("rewardserve.grpc")

# Stream errors that end the whole stream (the request itself is wrong); others are answered in-band.
STREAM_FATAL = frozenset({ErrorKind.INVALID_ARGUMENT, ErrorKind.NOT_FOUND, ErrorKind.PAYLOAD_TOO_LARGE})

_END = object()  # queue marker: the client half-closed and every request was answered


class ScoreStream:
    """One ScoreStream call: a reader task spawns one task per request, at most `max_stream_in_flight` at a
    time; answers go out in completion order through a queue. A fatal error (see STREAM_FATAL) aborts the call,
    once the requests read before the failing one are answered (those read after it are cancelled); leaving `run`
    in any way cancels the reader and every request still in flight."""

    def __init__(self, servicer: Any, context: grpc.aio.ServicerContext):
        self.servicer = servicer
        self.house = servicer.house
        self.context = context
        self.out: asyncio.Queue = asyncio.Queue()
        self.tasks: dict[asyncio.Task, int] = {}  # request tasks in flight -> their sequence
        # requests being answered at once; past it the reader stops reading (gRPC flow control pushes back), so
        # the answers queued in `out` are bounded by it too
        self.slots = asyncio.Semaphore(self.house.config.max_stream_in_flight)

    async def run(self, request_iterator: AsyncIterator) -> None:
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while (item := await self.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                await self.context.write(item)
        except _StreamAbort as stop:
            reader.cancel()  # nothing more is read
            first = await self._answer_earlier(stop)
            await abort(self.context, first.error)
        finally:
            for task in (reader, *self.tasks):
                task.cancel()

    async def _answer_earlier(self, stop: "_StreamAbort") -> "_StreamAbort":
        """Answer the requests read before the invalid one (accepted work is not thrown away, whatever the
        timing); cancel those read after it that are not answered yet (answers already made are sent). Returns
        the abort to end the stream with: that of the first invalid request, should one read earlier turn out
        invalid too (it failed later)."""
        for task, seq in list(self.tasks.items()):
            if seq > stop.sequence:
                task.cancel()
        await asyncio.gather(*(t for t, seq in list(self.tasks.items()) if seq < stop.sequence),
                             return_exceptions=True)
        while not self.out.empty():
            item = self.out.get_nowait()
            if isinstance(item, _StreamAbort) and item.sequence < stop.sequence:
                stop = item
            elif isinstance(item, reward_pb2.ScoreResponse):  # answered: sent, whichever side of it
                await self.context.write(item)
        return stop

    async def _read(self, request_iterator: AsyncIterator) -> None:
        try:
            sequence = 0
            async for request in request_iterator:
                await self.slots.acquire()
                task = asyncio.create_task(self._answer(request, sequence))
                self.tasks[task] = sequence
                task.add_done_callback(lambda done: self.tasks.pop(done, None))
                sequence += 1
            while self.tasks:
                # asyncio.wait, not gather: cancelling this reader (a later request was invalid) must not cancel
                # the requests still being answered, and a cancelled gather cancels everything it waits on
                await asyncio.wait(list(self.tasks))
            self.out.put_nowait(_END)
        except Exception as exc:  # a broken read (e.g. the client went away) ends the stream
            self.out.put_nowait(exc)

    async def _answer(self, request: reward_pb2.ScoreRequest, sequence: int) -> None:
        try:
            with Observed("ScoreStream", self.context) as obs:
                try:
                    outcome = await self.servicer._score(request, engine_deadline(self.house, self.context))
                    self.out.put_nowait(encode_outcome(outcome, request.request_id, sequence))
                except Exception as exc:  # not BaseException: a cancelled stream cancels its requests
                    error = typed(exc, "ScoreStream")
                    obs.fail(GRPC_STATUS[error.kind])
                    self.out.put_nowait(self._on_error(error, request.request_id, sequence))
        finally:
            self.slots.release()

    def _on_error(self, exc: RewardServeError, request_id: str, sequence: int) -> Any:
        if exc.kind in STREAM_FATAL:
            message = f"request_id={request_id} sequence={sequence}: {exc.message}"
            return _StreamAbort(RewardServeError(exc.kind, message), sequence)
        return encode_error(self.house.default, exc, request_id, sequence)


class _StreamAbort(Exception):
    def __init__(self, error: RewardServeError, sequence: int):
        super().__init__(error.message)
        self.error = error
        self.sequence = sequence
