"""Pure-ASGI edge middleware: body-size limit (413), request IDs, and per-route request metrics."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Awaitable, Callable

from service import metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"


def error_body(kind: str, message: str, code: int) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message, "code": code}}).encode()


async def _send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


class EdgeMiddleware:
    def __init__(self, app: Any, max_body_bytes: int, known_routes: set[str]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.known_routes = known_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = (_header(scope, REQUEST_ID_HEADER) or uuid.uuid4().hex.encode())[:128]
        scope.setdefault("state", {})["request_id"] = request_id.decode("latin-1")
        route = scope["path"] if scope["path"] in self.known_routes else "other"
        status = {"code": 500}
        start = time.perf_counter()
        metrics.IN_FLIGHT.labels("http").inc()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            body_receive = await self._read_limited(scope, receive, send_wrapper)
            if body_receive is not None:
                await self.app(scope, body_receive, send_wrapper)
        finally:
            metrics.IN_FLIGHT.labels("http").dec()
            metrics.REQUESTS.labels("http", route, str(status["code"])).inc()
            metrics.REQUEST_LATENCY.labels("http", route).observe(time.perf_counter() - start)

    async def _read_limited(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (bounded) and return a receive that replays it; None if 413 was sent."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        too_large = error_body(
            "payload_too_large", f"request body exceeds max_body_bytes={self.max_body_bytes}", 413
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send, 413, too_large, [(b"connection", b"close")])
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send_json(send, 413, too_large, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
