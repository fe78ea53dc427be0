"""gRPC API keys: an interceptor answering UNAUTHENTICATED without metadata `authorization: Bearer <key>`."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc

from service import metrics
from service.errors import ErrorKind, RewardServeError
from service.grpc_api.calls import abort
from service.keys import KeyChecker

OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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
        return _refusing(handler, details.method.rsplit("/", 1)[-1])


def _refusing(handler: Any, route: str) -> Any:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED (its kind in the trailing
    metadata, as every error status has it) and counts the refusal, as HTTP counts its 401s."""
    error = RewardServeError(ErrorKind.UNAUTHENTICATED,
                             "missing or wrong API key: send metadata authorization: Bearer <key>")

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        metrics.REQUESTS.labels("grpc", route, "UNAUTHENTICATED").inc()
        await abort(context, error)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return handler._replace(stream_stream=streaming)
    if handler.request_streaming:
        return handler._replace(stream_unary=streaming)
    if handler.response_streaming:
        return handler._replace(unary_stream=unary)
    return handler._replace(unary_unary=unary)
