"""HTTP API keys: a pure-ASGI middleware answering 401 without `Authorization: Bearer <key>`."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from service.http_api.edge import error_body
from service.keys import KeyChecker


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
