"""Score messages: protobuf -> engine inputs (validated as the HTTP body is) and engine outcomes -> protobuf."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos import reward_pb2
from service.engine import ScoreOutcome
from service.error_map import GRPC_STATUS
from service.errors import RewardServeError, invalid
from service.schemas import parse_inputs


# ---- protobuf -> engine --------------------------------------------------------------------------------
def message_to_dict(field: str, message: reward_pb2.Message) -> dict[str, Any]:
    """A Message as the dict ChatMessage validates; unset tool fields are left out."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls_json:
        try:
            calls = json.loads(message.tool_calls_json)
        except ValueError:
            raise invalid(f"{field}.tool_calls_json: not valid JSON") from None
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise invalid(f"{field}.tool_calls_json: must be a JSON array of objects")
        out["tool_calls"] = calls
    return out


def input_to_dict(index: int, inp: reward_pb2.ScoreInput) -> dict[str, Any]:
    """One ScoreInput as the plain dict `parse_inputs` validates (same rules as the HTTP body)."""
    form = inp.WhichOneof("input")
    if form == "pair":
        out: dict[str, Any] = {"prompt": inp.pair.prompt, "response": inp.pair.response}
        if inp.pair.step_separator:
            out["step_separator"] = inp.pair.step_separator
    elif form == "conversation":
        out = {"messages": [message_to_dict(f"inputs.{index}.conversation.messages.{j}", m)
                            for j, m in enumerate(inp.conversation.messages)]}
    elif form == "raw":
        out = {"raw": inp.raw}
    elif form == "steps":
        out = {"prompt": inp.steps.prompt, "steps": list(inp.steps.steps)}
    else:
        raise invalid(f"inputs.{index}: no input set: set one of pair, conversation, raw or steps")
    if inp.HasField("reference"):
        out["reference"] = inp.reference
    return out


class MalformedRequest:
    """What a request that does not parse as its protobuf message becomes; answered INVALID_ARGUMENT."""

    def __init__(self, error: str):
        self.error = error
        self.request_id = ""


def safe_deserializer(parse: Any) -> Any:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:  # grpc would answer UNKNOWN: it is the client's bytes that are wrong
            return MalformedRequest(str(exc))

    return deserialize


def check_parsed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise invalid(f"malformed request message: {request.error}")


def decode_inputs(request: reward_pb2.ScoreRequest) -> list:
    check_parsed(request)
    if not request.inputs:
        raise invalid("inputs is empty: send at least one input")
    return parse_inputs([input_to_dict(i, inp) for i, inp in enumerate(request.inputs)])


def decode_groups(request: reward_pb2.ScoreRequest) -> list[list[int]] | None:
    return [list(g.members) for g in request.groups] if request.groups else None


def engine_deadline(house: Any, context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as an engine (monotonic) deadline; without one the configured default."""
    remaining = context.time_remaining()
    if remaining is None:
        return house.deadline_from_timeout(None)
    return time.monotonic() + max(0.0, remaining)


# ---- engine -> protobuf --------------------------------------------------------------------------------
def encode_result(r: Any) -> reward_pb2.ScoreResult:
    return reward_pb2.ScoreResult(
        reward=r.reward, truncated=r.truncated, tokens=r.tokens, normalized=r.normalized,
        step_rewards=r.step_rewards or [], members=r.members or {}, std=r.std, rules=r.rules or {},
        advantage=r.advantage, advantage_centered=r.advantage_centered,
    )


def encode_outcome(outcome: ScoreOutcome, request_id: str, sequence: int = 0) -> reward_pb2.ScoreResponse:
    scores = [encode_result(r) for r in outcome.results]
    return reward_pb2.ScoreResponse(model=outcome.model, scores=scores, request_id=request_id, sequence=sequence)


def encode_error(model: str, exc: RewardServeError, request_id: str, sequence: int) -> reward_pb2.ScoreResponse:
    code = GRPC_STATUS[exc.kind].value[0]
    error = reward_pb2.RequestError(code=code, message=exc.message, type=exc.kind.value)
    return reward_pb2.ScoreResponse(model=model, request_id=request_id, sequence=sequence, error=error)


def encode_model(info: dict[str, Any]) -> reward_pb2.ModelInfo:
    stats = info.get("normalization")
    return reward_pb2.ModelInfo(
        id=info["id"], max_model_len=info.get("max_model_len", 0),
        normalization=reward_pb2.RewardStats(mean=stats["mean"], std=stats["std"]) if stats else None,
        kind=info.get("kind", "model"), aliases=info.get("aliases", []), members=info.get("members") or {},
        dtype=_joined(info.get("dtype", "")), forward=_joined(info.get("forward", "")),
        batch_invariant=info.get("batch_invariant"), compiled=bool(info.get("compiled")),
    )


def _joined(value: Any) -> str:
    """An ensemble over backbones that differ lists their values: one string here (`bfloat16,float32`)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def timing_metadata(outcome: ScoreOutcome) -> tuple[tuple[str, str], ...]:
    return (
        ("x-queue-time-ms", f"{outcome.queue_s * 1000:.3f}"),
        ("x-compute-time-ms", f"{outcome.compute_s * 1000:.3f}"),
    )
