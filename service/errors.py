"""Transport-free error kinds. HTTP and gRPC translate them at the edge (service/error_map.py)."""

from __future__ import annotations

import enum


class ErrorKind(str, enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHENTICATED = "unauthenticated"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    BACKEND = "backend_error"  # the model failed on an input (never on a client's mistake)
    INTERNAL = "internal"  # a bug of ours: logged with its traceback
    GENERATOR = "generator_error"  # the Best-of-N generator (policy) failed
    NOT_IMPLEMENTED = "not_implemented"  # a feature this server was not configured for (e.g. no generator)


class RewardServeError(Exception):
    """An error with a kind that every transport knows how to report."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"RewardServeError({self.kind.value}, {self.message!r})"


def invalid(message: str) -> RewardServeError:
    return RewardServeError(ErrorKind.INVALID_ARGUMENT, message)
