"""Pure-ASGI edge middlewares, outermost first:

- `EdgeMiddleware`: request ids, per-route request metrics, and a bound on HTTP requests in flight (503 at once
  past it, before anything is read);
- (`service/http_api/auth.py`: the API key, checked before the body is read);
- `BodyLimitMiddleware`: the body is read (bounded: 413 past `max_body_bytes`, 408 past `http_body_timeout_s`) and
  replayed to the app.

Every answer they make themselves is the JSON error body of service/error_map.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Awaitable, Callable

from service import metrics
from service.error_map import http_error
from service.errors import ErrorKind

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"


async def send_error(send: Send, kind: ErrorKind, message: str, extra: list[tuple[bytes, bytes]] = (),
                     status: int | None = None) -> None:
    status, body = http_error(kind, message, status)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


class InFlight:
    """HTTP requests being handled now (the drain waits for them to reach 0)."""

    def __init__(self) -> None:
        self.count = 0


PROBE_ROUTES = frozenset({"/health", "/ready", "/metrics"})
"""Answered however many requests are in flight: no model work, and what probes and scrapes need most under load
(a liveness probe refused while the server is busy would have it restarted)."""


class EdgeMiddleware:
    def __init__(self, app: Any, known_routes: set[str], max_in_flight: int, in_flight: InFlight):
        self.app = app
        self.known_routes = known_routes
        self.max_in_flight = max_in_flight
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = (header(scope, REQUEST_ID_HEADER) or uuid.uuid4().hex.encode())[:128]
        scope.setdefault("state", {})["request_id"] = request_id.decode("latin-1")
        route = scope["path"] if scope["path"] in self.known_routes else "other"
        status: dict[str, int | None] = {"code": None}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id)]
            await send(message)

        self.in_flight.count += 1
        metrics.IN_FLIGHT.labels("http").inc()
        failed = True
        try:
            if self.in_flight.count > self.max_in_flight and scope["path"] not in PROBE_ROUTES:
                await send_error(send_wrapper, ErrorKind.UNAVAILABLE,
                                 f"too many requests in flight (max_http_in_flight={self.max_in_flight}); retry later")
            else:
                await self.app(scope, receive, send_wrapper)
            failed = False
        finally:
            self.in_flight.count -= 1
            metrics.IN_FLIGHT.labels("http").dec()
            # nothing answered: the client went away first (499, as nginx counts it), unless we failed (500)
            code = status["code"] if status["code"] is not None else (500 if failed else 499)
            metrics.REQUESTS.labels("http", route, str(code)).inc()
            metrics.REQUEST_LATENCY.labels("http", route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_body_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body_receive = await self._read_limited(scope, receive, send)
        if body_receive is not None:
            if header(scope, b"content-type") is None:  # read as JSON, as vLLM's FastAPI routes read it
                scope = dict(scope, headers=[*scope.get("headers", []), (b"content-type", b"application/json")])
            await self.app(scope, body_receive, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, ErrorKind.PAYLOAD_TOO_LARGE,
                         f"request body exceeds max_body_bytes={self.max_body_bytes}", [(b"connection", b"close")])

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body (None: the client went away); _TooLarge past max_body_bytes."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _read_limited(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (bounded) and return a receive that replays it; None if 413 was sent."""
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return None
        try:
            async with asyncio.timeout(self.timeout_s):  # one deadline for the whole body, not one per chunk
                body = await self._read_body(receive)
        except TimeoutError:
            await send_error(send, ErrorKind.DEADLINE, f"the request body did not arrive within "
                             f"http_body_timeout_s={self.timeout_s:g} s", [(b"connection", b"close")], 408)
            return None
        except _TooLarge:
            await self._too_large(send)
            return None
        if body is None:  # the client went away
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


class _TooLarge(Exception):
    """The body passed max_body_bytes (BodyLimitMiddleware answers 413)."""
