"""FastAPI app factory: the routers, the error handlers and the edge middleware. Decode -> engine -> encode
happens in the routers (score_routes, compat_routes, bon_routes); errors become JSON bodies here."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.bon import BestOfN
from service.house import ModelHouse
from service.errors import ErrorKind, RewardServeError
from service.http_api.auth import AuthMiddleware
from service.http_api.bon_routes import bon_router
from service.error_map import kind_of_http_status
from service.http_api.common import ErrorResponse, error_response, not_json_message
from service.http_api.compat_routes import compat_router
from service.http_api.edge import BodyLimitMiddleware, EdgeMiddleware, InFlight
from service.http_api.score_routes import score_router
from service.keys import key_checker
from service.schemas import describe_validation_error

log = logging.getLogger("rewardserve.http")


def body_problem(request: Request, errors: Any) -> tuple[int, str] | None:
    """A request whose body as a whole is wrong (not JSON, not an object, absent), said as such: FastAPI's own
    words ("12: JSON decode error", "Field required") name no field and read like one."""
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            return 400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}{where}"
        if loc != ("body",) or isinstance(err.get("input"), dict):  # a field's, or the object's own check
            continue
        if isinstance(err.get("input"), (bytes, str)):  # not parsed: the content type did not say JSON
            return 400, not_json_message(request.headers.get("content-type"))
        if err.get("type") == "missing":
            return 422, "the request body is empty (or null): send a JSON object"
        return 422, f"the request body must be a JSON object, got {type(err.get('input')).__name__}"
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the JSON body of service/error_map.py: our typed errors, body validation (422),
    the framework's own (404 unknown route, 405, undecodable body) and, last, anything unexpected (500, logged
    with its traceback: a bug of ours, never a plain-text answer)."""

    @app.exception_handler(RewardServeError)
    async def _on_error(_: Request, exc: RewardServeError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
        status, message = body_problem(request, exc.errors()) or (422, describe_validation_error(exc))
        return error_response(RewardServeError(ErrorKind.INVALID_ARGUMENT, message), status=status)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for undecodable bytes
            message = "could not parse the request body: it must be UTF-8 encoded JSON"
        kind = kind_of_http_status(exc.status_code)
        return error_response(RewardServeError(kind, message), status=exc.status_code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_anything(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(RewardServeError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}"))


def create_app(house: ModelHouse, *, max_body_bytes: int | None = None, bon: Any = None) -> FastAPI:
    """`bon`: a service.bon.BestOfN (with the generator, if any); by default one without a generator."""
    app = FastAPI(
        title="rewardserve",
        version="0.1.0",
        description="Reward-model scoring with cross-request dynamic batching. Rewards are raw logits.",
    )
    app.state.house = house
    config = house.config

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> Response:
        """Readiness: every model is loaded and warmed, and the server is not draining."""
        if house.ready:
            return JSONResponse({"status": "ready", "model": house.default, "models": list(house.scorers)})
        return error_response(RewardServeError(ErrorKind.UNAVAILABLE, "not ready"))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served models and ensembles (OpenAI-style list; the first is the default)."""
        return {"object": "list", "data": house.describe()}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(score_router(house))  # /v1/score
    app.include_router(compat_router(house))  # /get_reward (OpenRLHF); /classify, /pooling, /tokenize (vLLM)

    app.state.bon = bon if bon is not None else BestOfN(house)
    app.include_router(bon_router(app.state.bon))  # /v1/best-of-n, /v1/rerank

    known = {route.path for route in app.routes}  # type: ignore[attr-defined]
    limit = max_body_bytes if max_body_bytes is not None else config.max_body_bytes
    # added last = outermost: counted and bounded (Edge), then the key (Auth), then the body read (BodyLimit)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limit, timeout_s=config.http_body_timeout_s)
    app.add_middleware(AuthMiddleware, checker=key_checker(config), open_routes=config.open_routes)
    app.state.in_flight = InFlight()
    app.add_middleware(EdgeMiddleware, known_routes=known, max_in_flight=config.max_http_in_flight,
                       in_flight=app.state.in_flight)
    return app
