"""gRPC BestOfN / Rerank messages <-> service.schemas models. Validation is the HTTP body's (same messages)."""

from __future__ import annotations

from typing import Any

from protos import reward_pb2
from service.bon import RankedOutcome
from service.errors import invalid
from service.grpc_api.codecs import message_to_dict
from service.schemas import BestOfNRequest, RankedCandidate, RerankRequest, parse_request

SAMPLING_FIELDS = ("n", "temperature", "top_p", "max_tokens", "seed")


def _context(request: Any) -> dict[str, Any]:
    form = request.WhichOneof("context")
    if form == "prompt":
        return {"prompt": request.prompt}
    if form == "conversation":
        return {"messages": [message_to_dict(f"conversation.messages.{j}", m)
                             for j, m in enumerate(request.conversation.messages)]}
    raise invalid("context: set one of prompt or conversation")


def decode_best_of_n(request: reward_pb2.BestOfNRequest) -> BestOfNRequest:
    data: dict[str, Any] = {"model": request.model or None, **_context(request)}
    for name in SAMPLING_FIELDS:  # unset optional fields keep the HTTP defaults
        if request.HasField(name):
            data[name] = getattr(request, name)
    if request.aggregate:
        data["aggregate"] = request.aggregate
    return parse_request(BestOfNRequest, data)


def decode_rerank(request: reward_pb2.RerankRequest) -> RerankRequest:
    data = {"model": request.model or None, **_context(request), "candidates": list(request.candidates)}
    if request.aggregate:
        data["aggregate"] = request.aggregate
    return parse_request(RerankRequest, data)


def encode_candidate(c: RankedCandidate) -> reward_pb2.RankedCandidate:
    return reward_pb2.RankedCandidate(
        text=c.text, reward=c.reward, rank=c.rank, index=c.index, truncated=c.truncated, tokens=c.tokens,
        finish_reason=c.finish_reason or "", step_rewards=c.step_rewards or [], members=c.members or {}, std=c.std,
    )


def encode_best_of_n(outcome: RankedOutcome, request_id: str) -> reward_pb2.BestOfNResponse:
    candidates = [encode_candidate(c) for c in outcome.candidates]
    return reward_pb2.BestOfNResponse(
        model=outcome.model, generator=outcome.generator or "", best=candidates[0], candidates=candidates,
        request_id=request_id,
    )


def encode_rerank(outcome: RankedOutcome, request_id: str) -> reward_pb2.RerankResponse:
    candidates = [encode_candidate(c) for c in outcome.candidates]
    return reward_pb2.RerankResponse(model=outcome.model, candidates=candidates, request_id=request_id)


def timing_metadata(outcome: RankedOutcome) -> tuple[tuple[str, str], ...]:
    pairs = [("x-queue-time-ms", outcome.queue_s), ("x-compute-time-ms", outcome.compute_s)]
    if outcome.generator is not None:
        pairs.append(("x-generation-time-ms", outcome.generation_s))
    return tuple((key, f"{seconds * 1000:.3f}") for key, seconds in pairs)
