"""Error kind -> HTTP status and -> gRPC status code: the two tables, in one file."""

from __future__ import annotations

import grpc

from service.errors import ErrorKind

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.CANCELLED: 499,
    ErrorKind.BACKEND: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE: 504,
    ErrorKind.GENERATOR: 502,
    ErrorKind.NOT_IMPLEMENTED: 400,  # a request this server is not configured for (type not_implemented)
}

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.BACKEND: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.GENERATOR: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.NOT_IMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
}

assert set(HTTP_STATUS) == set(ErrorKind) == set(GRPC_STATUS), "every error kind needs both mappings"
