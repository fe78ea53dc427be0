"""`POST /v1/score`: decode the body, score through the named model or ensemble, encode the answer."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from service.house import ModelHouse
from service.http_api.common import (
    ERROR_RESPONSES, TIMEOUT_HEADER, parse_timeout_header, run_unless_disconnected, timing_headers,
)
from service.schemas import ScoreInput, ScoreResult


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="A served model or ensemble (its name or an alias); "
                              "default: the first model.")
    inputs: list[ScoreInput] = Field(min_length=1, description="Inputs to score, answered in the same order.")
    groups: list[list[StrictInt]] | None = Field(  # strict: true/false or 1.0 are not indices
        default=None, description="GRPO groups: lists of input indices that answer the same prompt; each grouped "
        "score also gets `advantage` and `advantage_centered` within its group.")
    normalize: StrictBool = Field(default=False, description="Also return rewards normalized with the model's stats.")
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds before the request fails with 504 (also the X-Request-Timeout header)."
    )


class ScoreResponse(BaseModel):
    model: str
    scores: list[ScoreResult]


def score_router(house: ModelHouse) -> APIRouter:
    router = APIRouter(tags=["scoring"])

    @router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
    async def score(
        body: ScoreRequest,
        request: Request,
        response: Response,
        x_request_timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER),
    ) -> ScoreResponse:
        """Score inputs with the reward model. Rewards are raw logits, in input order."""
        timeout = body.timeout if body.timeout is not None else parse_timeout_header(x_request_timeout)
        deadline = house.deadline_from_timeout(timeout)
        outcome = await run_unless_disconnected(request, house.score(
            body.inputs, model=body.model, deadline=deadline, normalize=body.normalize, groups=body.groups))
        response.headers.update(timing_headers(outcome))
        return ScoreResponse(model=outcome.model, scores=outcome.results)

    return router
