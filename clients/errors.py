"""Typed client errors, and the two tables that turn an HTTP status or a gRPC status code into one.

Each error class says how the retry loop treats it (`retry`):
- NEVER: raise at once (the request is wrong, or the deadline has passed: sending it again cannot help);
- BACKOFF: the server is busy; retry after an exponential, fully jittered pause;
- FAILOVER: this endpoint cannot serve now (connection error, draining, gateway error); retry on the next
  endpoint at once if one is up, else after a pause; the endpoint sits out a cool-down.
"""

from __future__ import annotations

import json
from typing import Any

NEVER, BACKOFF, FAILOVER = "never", "backoff", "failover"


class RewardClientError(Exception):
    """Any failed call. `type`/`code`/`message` are the server's (HTTP error body, or gRPC status)."""

    retry = NEVER

    def __init__(self, message: str, *, type: str = "error", code: int | str | None = None,
                 endpoint: str | None = None):
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code  # HTTP status (int) or gRPC status code name (str); None when no answer came
        self.endpoint = endpoint
        self.attempts = 1  # set by the retry loop: how many requests this call sent

    def __str__(self) -> str:
        where = f" from {self.endpoint}" if self.endpoint else ""
        code = f" {self.code}" if self.code is not None else ""
        return f"[{self.type}{code}{where}] {self.message}"


class InvalidInputError(RewardClientError):
    """The request is wrong (HTTP 400/422, INVALID_ARGUMENT); the message names the field. Never retried."""


class NotFoundError(InvalidInputError):
    """Unknown model or route (HTTP 404, NOT_FOUND). Never retried."""


class PayloadTooLargeError(InvalidInputError):
    """The request is over the server's size limit (HTTP 413, oversized gRPC message): use a smaller
    `max_batch_size`. Never retried."""


class AuthenticationError(RewardClientError):
    """Missing or wrong API key (HTTP 401/403, UNAUTHENTICATED, PERMISSION_DENIED). Never retried."""


class OverloadedError(RewardClientError):
    """The server's queue is full (HTTP 429, RESOURCE_EXHAUSTED). Retried with backoff."""

    retry = BACKOFF


class UnavailableError(RewardClientError):
    """No answer (connection refused or reset), server draining (HTTP 503, UNAVAILABLE), a call the server cut
    off (CANCELLED while it shuts down) or a gateway error (502, a proxy's 504). Fails over to the next endpoint,
    then backs off."""

    retry = FAILOVER


class DeadlineExceededError(RewardClientError):
    """The call's timeout passed (HTTP 504 from the server, DEADLINE_EXCEEDED, or the client's own clock).
    Never retried: the time the caller allowed is spent."""


class ServerError(RewardClientError):
    """The server failed (HTTP 500, INTERNAL, an answer that does not parse). Never retried: scoring is
    deterministic, the same input would fail again."""


class ClientClosedError(RewardClientError):
    """The client was used after `close()` (or after its `with` / `async with` block). Never retried: open a new
    client."""


HTTP_ERRORS: dict[int, type[RewardClientError]] = {
    400: InvalidInputError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    413: PayloadTooLargeError, 422: InvalidInputError, 429: OverloadedError, 500: ServerError,
    502: UnavailableError, 503: UnavailableError, 504: UnavailableError,
}

GRPC_ERRORS: dict[str, type[RewardClientError]] = {
    "INVALID_ARGUMENT": InvalidInputError, "OUT_OF_RANGE": InvalidInputError,
    "FAILED_PRECONDITION": InvalidInputError, "NOT_FOUND": NotFoundError,
    "UNAUTHENTICATED": AuthenticationError, "PERMISSION_DENIED": AuthenticationError,
    "RESOURCE_EXHAUSTED": OverloadedError, "UNAVAILABLE": UnavailableError,
    # a call the caller cancels ends in asyncio.CancelledError / grpc.FutureCancelledError, never in a status:
    # a CANCELLED status means the server (shutting down) or the transport cut the call before it was answered
    "CANCELLED": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
}


def http_error(status: int, body: bytes, endpoint: str) -> RewardClientError:
    """The error for a non-2xx answer. Our server's bodies are {"error": {"type", "message", "code"}}."""
    detail = _error_body(body)
    kind = detail.get("type") or f"http_{status}"
    message = str(detail.get("message") or body[:500].decode("utf-8", "replace") or f"HTTP {status}")
    if status == 504 and kind == "deadline_exceeded":  # ours: the deadline we sent has passed
        cls: type[RewardClientError] = DeadlineExceededError
    elif status == 400 and not detail:
        # our server refuses inputs with its JSON body; a bare 400 (uvicorn's "Invalid HTTP request received",
        # a proxy's page) refused the HTTP request itself: nothing says the inputs are wrong
        cls, kind = RewardClientError, "bad_http_request"
        message = f"HTTP 400 without rewardserve's error body (the HTTP request was refused, not its inputs): {message}"
    else:  # a bare 504 comes from a proxy in front: the upstream is stuck, another may answer
        cls = HTTP_ERRORS.get(status, ServerError if status >= 500 else RewardClientError)
    return cls(message, type=kind, code=status, endpoint=endpoint)


def _error_body(body: bytes) -> dict[str, Any]:
    try:
        detail = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return {}
    return detail if isinstance(detail, dict) else {}


def grpc_error(code_name: str, details: str, endpoint: str, kind: str | None = None) -> RewardClientError:
    """The error for a failed gRPC call, by status code name (e.g. "UNAVAILABLE"); `kind`: the server's
    `rewardserve-error-type` (e.g. "overloaded"), else the code's name in lower case."""
    cls = GRPC_ERRORS.get(code_name, ServerError)
    kind = kind or code_name.lower()
    if code_name == "RESOURCE_EXHAUSTED" and "larger than max" in details:  # message size, not queue
        # refused by gRPC itself (no handler ran, so no rewardserve-error-type): the kind HTTP's 413 has
        cls, kind = PayloadTooLargeError, "payload_too_large"
    return cls(details or code_name, type=kind, code=code_name, endpoint=endpoint)
