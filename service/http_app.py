"""FastAPI app factory: routes only. Decode -> engine -> encode; errors translated by error_map."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.engine import RewardEngine, ScoreOutcome
from service.error_map import HTTP_STATUS
from service.errors import ErrorKind, RewardServeError, invalid
from service.auth import AuthMiddleware, key_checker
from service.http_edge import EdgeMiddleware
from service.schemas import ScoreInput, ScoreResult, describe_validation_error

log = logging.getLogger("rewardserve.http")

TIMEOUT_HEADER = "X-Request-Timeout"


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Model name; must match the served model if given.")
    inputs: list[ScoreInput] = Field(min_length=1, description="Inputs to score, answered in the same order.")
    normalize: bool = Field(default=False, description="Also return rewards normalized with the model's stats.")
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds before the request fails with 504 (also the X-Request-Timeout header)."
    )


class ScoreResponse(BaseModel):
    model: str
    scores: list[ScoreResult]


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 429, 500, 503, 504)
}


HTTP_ERROR_TYPES = {400: "invalid_argument", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(exc: RewardServeError) -> JSONResponse:
    code = HTTP_STATUS[exc.kind]
    return JSONResponse(
        {"error": {"type": exc.kind.value, "message": exc.message, "code": code}}, status_code=code
    )


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


def parse_timeout_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise invalid(f"{TIMEOUT_HEADER} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise invalid(f"{TIMEOUT_HEADER} must be positive, got {value!r}")
    return seconds


def timing_headers(outcome: ScoreOutcome) -> dict[str, str]:
    return {
        "X-Queue-Time-Ms": f"{outcome.queue_s * 1000:.3f}",
        "X-Compute-Time-Ms": f"{outcome.compute_s * 1000:.3f}",
    }


def create_app(engine: RewardEngine, *, max_body_bytes: int | None = None, bon: Any = None) -> FastAPI:
    """`bon`: a service.bon.BestOfN (with the generator, if any); by default one without a generator."""
    app = FastAPI(
        title="rewardserve",
        version="0.1.0",
        description="Reward-model scoring with cross-request dynamic batching. Rewards are raw logits.",
    )
    app.state.engine = engine

    @app.exception_handler(RewardServeError)
    async def _on_error(_: Request, exc: RewardServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message = describe_validation_error(exc)  # type: ignore[arg-type]
        body = {"error": {"type": "invalid_argument", "message": message, "code": 422}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for undecodable bytes
            message = "could not parse the request body: it must be UTF-8 encoded JSON"
        kind = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        body = {"error": {"type": kind, "message": message, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
    async def score(
        body: ScoreRequest,
        request: Request,
        response: Response,
        x_request_timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER),
    ) -> ScoreResponse:
        """Score inputs with the reward model. Rewards are raw logits, in input order."""
        timeout = body.timeout if body.timeout is not None else parse_timeout_header(x_request_timeout)
        deadline = engine.deadline_from_timeout(timeout)
        outcome = await run_unless_disconnected(
            request,
            engine.score(body.inputs, model=body.model, deadline=deadline, normalize=body.normalize),
        )
        response.headers.update(timing_headers(outcome))
        return ScoreResponse(model=outcome.model, scores=outcome.results)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and warmed, and the server is not draining."""
        if engine.ready:
            return JSONResponse({"status": "ready", "model": engine.name})
        return error_response(RewardServeError(ErrorKind.UNAVAILABLE, "not ready"))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served model (OpenAI-style list)."""
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.name,
                    "object": "model",
                    "owned_by": "rewardserve",
                    "max_model_len": engine.max_length,
                    "normalization": engine.stats.to_json() if engine.stats else None,
                }
            ],
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    from service.compat_routes import compat_router  # here, not at the top: it imports this module's helpers

    app.include_router(compat_router(engine))  # /get_reward (OpenRLHF), /classify and /pooling (vLLM)

    from service.bon import BestOfN
    from service.bon_routes import bon_router

    app.state.bon = bon if bon is not None else BestOfN(engine)
    app.include_router(bon_router(app.state.bon))  # /v1/best-of-n, /v1/rerank

    known = {route.path for route in app.routes}  # type: ignore[attr-defined]
    limit = max_body_bytes if max_body_bytes is not None else engine.config.max_body_bytes
    # added last = outermost: requests are counted and size-limited before the key check
    app.add_middleware(AuthMiddleware, checker=key_checker(engine.config), open_routes=engine.config.open_routes)
    app.add_middleware(EdgeMiddleware, max_body_bytes=limit, known_routes=known)
    return app
