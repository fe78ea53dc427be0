"""What every HTTP router shares: the error body and its OpenAPI schema, the request deadline header, timing
headers, and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.error_map import http_error
from service.errors import ErrorKind, RewardServeError, invalid

TIMEOUT_HEADER = "X-Request-Timeout"


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 500, 503, 504)
}


def error_response(exc: RewardServeError, status: int | None = None, headers: dict | None = None) -> Response:
    """The JSON error answer of an error (service/error_map.py); `status` overrides the kind's own."""
    code, body = http_error(exc.kind, exc.message, status)
    return Response(body, status_code=code, media_type="application/json", headers=headers)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`; if the client goes away first, cancel it (its queued inputs are then skipped)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise RewardServeError(ErrorKind.CANCELLED, "client disconnected")
    return task.result()


def not_json_message(content_type: str | None) -> str:
    return f"the request body must be JSON (content-type application/json), got content-type {content_type!r}"


def parse_timeout_header(value: str | None) -> float | None:
    if value is None:
        return None
    shown = value.encode("latin-1", "replace").decode("utf-8", "replace")  # ASGI hands header bytes as latin-1
    try:
        seconds = float(value)
    except ValueError:
        raise invalid(f"{TIMEOUT_HEADER} must be a number of seconds, got {shown!r}") from None
    if not 0 < seconds < math.inf:
        raise invalid(f"{TIMEOUT_HEADER} must be a positive, finite number of seconds, got {shown!r}")
    return seconds


def timing_headers(outcome: Any) -> dict[str, str]:
    """`X-Queue-Time-Ms` and `X-Compute-Time-Ms` of anything timed (a ScoreOutcome, a RankedOutcome)."""
    return {
        "X-Queue-Time-Ms": f"{outcome.queue_s * 1000:.3f}",
        "X-Compute-Time-Ms": f"{outcome.compute_s * 1000:.3f}",
    }
