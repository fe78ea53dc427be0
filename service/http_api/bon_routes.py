"""HTTP routes of Best-of-N and rerank: decode -> service.bon.BestOfN -> encode. Errors as every route's.

- `POST /v1/best-of-n`: generate `n` candidates with the configured generator, score them, best first.
- `POST /v1/rerank`: score the given candidates of one prompt, best first (no generator needed).
"""

from __future__ import annotations

from fastapi import APIRouter, Header, Request, Response

from service.bon import BestOfN, RankedOutcome
from service.http_api.common import (
    ERROR_RESPONSES, TIMEOUT_HEADER, parse_timeout_header, run_unless_disconnected, timing_headers,
)
from service.schemas import BestCandidate, BestOfNRequest, BestOfNResponse, RerankRequest, RerankResponse

RESPONSES = {**ERROR_RESPONSES, 501: ERROR_RESPONSES[400], 502: ERROR_RESPONSES[400]}  # no generator; it failed


def _headers(outcome: RankedOutcome) -> dict[str, str]:
    headers = timing_headers(outcome)
    if outcome.generator is not None:
        headers["X-Generation-Time-Ms"] = f"{outcome.generation_s * 1000:.3f}"
    return headers


def bon_router(bon: BestOfN) -> APIRouter:
    router = APIRouter(tags=["best-of-n"])
    house = bon.house

    def deadline_of(body: BestOfNRequest | RerankRequest, header: str | None) -> float | None:
        timeout = body.timeout if body.timeout is not None else parse_timeout_header(header)
        return house.deadline_from_timeout(timeout)

    @router.post("/v1/best-of-n", response_model=BestOfNResponse, responses=RESPONSES)
    async def best_of_n(
        body: BestOfNRequest, request: Request, response: Response,
        x_request_timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER),
    ) -> BestOfNResponse:
        """Generate `n` candidates with the server's generator (policy), score each (context, candidate) with
        the reward model, and return them best first. 501 `not_implemented` when no generator is configured;
        502 when the generator fails; 504 when the deadline (or generation_timeout_s) passes."""
        outcome = await run_unless_disconnected(request, bon.best_of_n(body, deadline_of(body, x_request_timeout)))
        response.headers.update(_headers(outcome))
        best = outcome.best
        return BestOfNResponse(
            model=outcome.model, generator=outcome.generator or "", candidates=outcome.candidates,
            best=BestCandidate(text=best.text, reward=best.reward),
        )

    @router.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
    async def rerank(
        body: RerankRequest, request: Request, response: Response,
        x_request_timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER),
    ) -> RerankResponse:
        """Score each (context, candidate) with the reward model; return the candidates best first."""
        outcome = await run_unless_disconnected(request, bon.rerank(body, deadline_of(body, x_request_timeout)))
        response.headers.update(_headers(outcome))
        return RerankResponse(model=outcome.model, candidates=outcome.candidates)

    return router
