"""Call accounting for gRPC handlers: in-flight gauge, latency and request counts by status code."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from service import metrics
from service.error_map import GRPC_STATUS, grpc_error_metadata
from service.errors import ErrorKind, RewardServeError

log = logging.getLogger("rewardserve.grpc")


def typed(exc: Exception, method: str) -> RewardServeError:
    """Any error of a handler as a typed one; an unexpected exception is a bug of ours, logged (INTERNAL)."""
    if isinstance(exc, RewardServeError):
        return exc
    log.error("%s failed", method, exc_info=exc)
    return RewardServeError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


async def abort(context: grpc.aio.ServicerContext, error: RewardServeError) -> None:
    """End the call with the error's status code, its message and its kind in the trailing metadata. A call gRPC
    has already ended (its deadline passed, the client cancelled) is left as it is: aborting it again made grpc log
    an ExecuteBatchError as if the server had failed."""
    if context.done():
        raise asyncio.CancelledError()  # what grpc.aio expects of a handler whose call is over
    await context.abort(GRPC_STATUS[error.kind], error.message, trailing_metadata=grpc_error_metadata(error.kind))


class Observed:
    """Counts one request: in-flight while inside, then latency and REQUESTS{code} on exit.

    The code is OK unless `fail` set another. A CancelledError leaving the block means grpc.aio gave up the
    call: DEADLINE_EXCEEDED if its deadline has passed, else CANCELLED (the client went away).
    """

    def __init__(self, method: str, context: grpc.aio.ServicerContext):
        self.method = method
        self.context = context
        self.code: grpc.StatusCode | None = None

    def fail(self, code: grpc.StatusCode) -> None:
        self.code = code

    def __enter__(self) -> "Observed":
        self.start = time.perf_counter()
        metrics.IN_FLIGHT.labels("grpc").inc()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        metrics.IN_FLIGHT.labels("grpc").dec()
        code = self.code or (grpc.StatusCode.OK if exc_type is None else self._code_of(exc_type))
        metrics.REQUESTS.labels("grpc", self.method, code.name).inc()
        metrics.REQUEST_LATENCY.labels("grpc", self.method).observe(time.perf_counter() - self.start)

    def _code_of(self, exc_type: type) -> grpc.StatusCode:
        if not issubclass(exc_type, asyncio.CancelledError):
            return grpc.StatusCode.UNKNOWN
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
