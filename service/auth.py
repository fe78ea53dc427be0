"""API keys: HTTP `Authorization: Bearer <key>` and gRPC metadata `authorization: Bearer <key>`.

When keys are configured, every route needs one except the open ones (by default /health, /ready and /metrics
over HTTP, and the gRPC health and reflection services). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import grpc

from service.http_edge import error_body

OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class KeyChecker:
    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | bytes | None) -> bool:
        """True for `Bearer <one of the keys>`; every key is compared, in constant time."""
        if authorization is None:
            return False
        value = authorization if isinstance(authorization, bytes) else authorization.encode()
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        return any([hmac.compare_digest(token, key) for key in self._keys])


def load_keys(inline: Iterable[str], key_file: str | None) -> list[str]:
    """Keys from the config (flag/env, comma-separated) and from a file (one per line, # comments)."""
    keys = [k.strip() for k in inline if k.strip()]
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return keys


def key_checker(config: Any) -> KeyChecker:
    return KeyChecker(load_keys(config.api_keys, config.api_key_file))


class AuthMiddleware:
    """Pure ASGI: 401 for HTTP requests without a valid key, except on the open routes."""

    def __init__(self, app: Any, checker: KeyChecker, open_routes: Iterable[str]):
        self.app = app
        self.checker = checker
        self.open_routes = set(open_routes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.checker.enabled or scope["path"] in self.open_routes:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers", [])).get(b"authorization")
        if self.checker.check(header):
            await self.app(scope, receive, send)
            return
        body = error_body("unauthenticated", "missing or wrong API key: send Authorization: Bearer <key>", 401)
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for gRPC calls without a valid key, except health checks and reflection."""

    def __init__(self, checker: KeyChecker):
        self.checker = checker

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if not self.checker.enabled or details.method.startswith(OPEN_GRPC_SERVICES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if self.checker.check(metadata.get("authorization")):
            return await continuation(details)
        handler = await continuation(details)
        return _refusing(handler)


def _refusing(handler: Any) -> Any:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""
    message = "missing or wrong API key: send metadata authorization: Bearer <key>"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return handler._replace(stream_stream=streaming)
    if handler.request_streaming:
        return handler._replace(stream_unary=streaming)
    if handler.response_streaming:
        return handler._replace(unary_stream=unary)
    return handler._replace(unary_unary=unary)
