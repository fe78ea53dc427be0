"""Call accounting for gRPC handlers: in-flight gauge, latency and request counts by status code."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from service import metrics


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
