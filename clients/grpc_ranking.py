"""BestOfN / Rerank over gRPC for the clients: the HTTP body (clients/ranking.py) as a request message, and
the reply as the HTTP answer's shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import InvalidInputError
from .wire import proto_message, reward_pb2


def ranked_request(kind: str, body: Mapping[str, Any], request_id: str) -> Any:
    fields: dict[str, Any] = {"model": body.get("model") or "", "request_id": request_id}
    if "prompt" in body:
        fields["prompt"] = body["prompt"]
    else:
        try:
            messages = [proto_message(m) for m in body["messages"]]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"messages: {exc}", type="invalid_argument") from None
        fields["conversation"] = reward_pb2.Conversation(messages=messages)
    if kind == "rerank":
        return reward_pb2.RerankRequest(candidates=list(body["candidates"]), **fields)
    for name in ("n", "temperature", "top_p", "max_tokens", "seed"):
        if body.get(name) is not None:
            fields[name] = body[name]
    return reward_pb2.BestOfNRequest(**fields)


def reply_as_json(reply: Any) -> dict[str, Any]:
    candidates = [
        {"text": c.text, "reward": c.reward, "rank": c.rank, "index": c.index, "truncated": c.truncated,
         "tokens": c.tokens, "finish_reason": c.finish_reason or None}
        for c in reply.candidates
    ]
    return {"model": reply.model, "generator": getattr(reply, "generator", "") or None, "candidates": candidates}
