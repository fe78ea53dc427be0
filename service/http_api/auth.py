"""HTTP API keys: a pure-ASGI middleware answering 401 without `Authorization: Bearer <key>`. It sits outside the
body reader, so a request without a key is refused before its body is read."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from service.errors import ErrorKind
from service.http_api.edge import send_error
from service.keys import KeyChecker


class AuthMiddleware:
    """401 for HTTP requests without a valid key, except on the open routes."""

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
        await send_error(send, ErrorKind.UNAUTHENTICATED, "missing or wrong API key: send Authorization: Bearer <key>",
                         [(b"www-authenticate", b"Bearer")])
