"""Error kind -> HTTP status, gRPC status code and the JSON error body: one table, in one file.

Every error leaves the server through here: HTTP bodies are `{"error": {"type", "message", "code"}}` where `type`
is the kind's machine-readable name (distinct for every kind, so clients never search messages), and gRPC calls
end with the kind's status code plus the same name in the trailing metadata `rewardserve-error-type` (needed where
two kinds share a code: `overloaded` and `payload_too_large` are both RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import grpc

from service.errors import ErrorKind

ERROR_TYPE_METADATA = "rewardserve-error-type"


class Mapping(NamedTuple):
    http: int
    grpc: grpc.StatusCode


TABLE: dict[ErrorKind, Mapping] = {
    ErrorKind.INVALID_ARGUMENT: Mapping(400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.UNAUTHENTICATED: Mapping(401, grpc.StatusCode.UNAUTHENTICATED),
    ErrorKind.NOT_FOUND: Mapping(404, grpc.StatusCode.NOT_FOUND),
    ErrorKind.METHOD_NOT_ALLOWED: Mapping(405, grpc.StatusCode.UNIMPLEMENTED),
    ErrorKind.PAYLOAD_TOO_LARGE: Mapping(413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.OVERLOADED: Mapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.CANCELLED: Mapping(499, grpc.StatusCode.CANCELLED),
    ErrorKind.BACKEND: Mapping(500, grpc.StatusCode.INTERNAL),
    ErrorKind.INTERNAL: Mapping(500, grpc.StatusCode.INTERNAL),
    ErrorKind.NOT_IMPLEMENTED: Mapping(501, grpc.StatusCode.UNIMPLEMENTED),
    ErrorKind.GENERATOR: Mapping(502, grpc.StatusCode.UNAVAILABLE),
    ErrorKind.UNAVAILABLE: Mapping(503, grpc.StatusCode.UNAVAILABLE),
    ErrorKind.DEADLINE: Mapping(504, grpc.StatusCode.DEADLINE_EXCEEDED),
}

assert set(TABLE) == set(ErrorKind), "every error kind needs its mapping"
HTTP_STATUS: dict[ErrorKind, int] = {kind: m.http for kind, m in TABLE.items()}
GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {kind: m.grpc for kind, m in TABLE.items()}
_BY_HTTP: dict[int, ErrorKind] = {}
for _kind, _m in TABLE.items():
    _BY_HTTP.setdefault(_m.http, _kind)


def kind_of_http_status(status: int) -> ErrorKind:
    """The kind an HTTP status from a framework (404 unknown route, 405, 413, ...) is reported as."""
    return _BY_HTTP.get(status, ErrorKind.INVALID_ARGUMENT if 400 <= status < 500 else ErrorKind.INTERNAL)


def http_error(kind: ErrorKind, message: str, status: int | None = None) -> tuple[int, bytes]:
    """(status, JSON body) of an error; `status` overrides the kind's own (e.g. 422 for body validation)."""
    code = status if status is not None else HTTP_STATUS[kind]
    return code, json.dumps({"error": {"type": kind.value, "message": message, "code": code}}).encode()


def grpc_error_metadata(kind: ErrorKind) -> tuple[tuple[str, str], ...]:
    return ((ERROR_TYPE_METADATA, kind.value),)
