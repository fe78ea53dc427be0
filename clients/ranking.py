"""Best-of-N and rerank calls of the four clients: `best_of_n(...)` and `rerank(...)` -> RankedResult.

The transports add `_ranked_once(endpoint, remaining, *, kind, body, request_id)` (kind: "best-of-n" or
"rerank", body: the HTTP JSON body); the calls go through the same retry loop as `score` (a 502 from a failing
generator fails over to the next endpoint, like a 503).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidInputError, ServerError
from .types import check_text


@dataclass(frozen=True)
class RankedCandidate:
    text: str
    reward: float  # raw logit of the reward model for (context, text)
    rank: int  # 1 for the highest reward
    index: int  # position in the request's candidates (rerank) or sample order (best-of-n)
    truncated: bool
    tokens: int
    finish_reason: str | None = None  # best-of-n: "stop" or "length"


@dataclass(frozen=True)
class RankedResult:
    model: str
    candidates: list[RankedCandidate]  # best first
    generator: str | None = None  # best-of-n: the policy that generated

    @property
    def best(self) -> RankedCandidate:
        return self.candidates[0]


def context_body(prompt: str | None, messages: Sequence[Mapping[str, str]] | None, model: str | None) -> dict:
    if (prompt is None) == (messages is None):
        raise InvalidInputError("give exactly one of prompt or messages", type="invalid_argument")
    body: dict[str, Any] = {"prompt": prompt} if prompt is not None else {"messages": [dict(m) for m in messages or []]}
    if model:
        body["model"] = model
    return body


def best_of_n_body(prompt: str | None, messages: Any, model: str | None, n: int, temperature: float, top_p: float,
                   max_tokens: int, seed: int | None) -> dict:
    body = {**context_body(prompt, messages, model), "n": n, "temperature": temperature, "top_p": top_p,
            "max_tokens": max_tokens}
    if seed is not None:
        body["seed"] = seed
    return body


def parse_ranked(data: Mapping[str, Any], endpoint: str) -> RankedResult:
    """The HTTP answer's JSON (the gRPC client converts its reply to the same shape)."""
    try:
        candidates = [
            RankedCandidate(str(c["text"]), float(c["reward"]), int(c["rank"]), int(c["index"]), bool(c["truncated"]),
                            int(c["tokens"]), c.get("finish_reason") or None)
            for c in data["candidates"]
        ]
        return RankedResult(str(data["model"]), candidates, data.get("generator") or None)
    except (KeyError, TypeError, ValueError) as exc:
        raise ServerError(f"unexpected ranking answer: {exc!r}", type="bad_response", endpoint=endpoint) from None


class _Ranking:
    """Mixed into the clients, which provide `model`, `_deadline`, `_call` and `_ranked_once`."""

    model: str | None

    def _ranked_call(self, kind: str, body: dict, timeout: float | None, request_id: str | None) -> tuple:
        check_text(body)
        send = functools.partial(self._ranked_once, kind=kind, body=body, request_id=request_id or uuid.uuid4().hex)
        return send, self._deadline(timeout)


class SyncRanking(_Ranking):
    def best_of_n(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                  n: int = 4, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 128,
                  seed: int | None = None, model: str | None = None, timeout: float | None = None,
                  request_id: str | None = None) -> RankedResult:
        """Generate `n` candidates with the server's generator, scored and ranked best first."""
        body = best_of_n_body(prompt, messages, model or self.model, n, temperature, top_p, max_tokens, seed)
        return self._call(*self._ranked_call("best-of-n", body, timeout, request_id))

    def rerank(self, candidates: Sequence[str], prompt: str | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None, model: str | None = None,
               timeout: float | None = None, request_id: str | None = None) -> RankedResult:
        """Score the candidates of one prompt (or conversation), ranked best first."""
        body = {**context_body(prompt, messages, model or self.model), "candidates": list(candidates)}
        return self._call(*self._ranked_call("rerank", body, timeout, request_id))


class AsyncRanking(_Ranking):
    async def best_of_n(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                        n: int = 4, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 128,
                        seed: int | None = None, model: str | None = None, timeout: float | None = None,
                        request_id: str | None = None) -> RankedResult:
        body = best_of_n_body(prompt, messages, model or self.model, n, temperature, top_p, max_tokens, seed)
        return await self._call(*self._ranked_call("best-of-n", body, timeout, request_id))

    async def rerank(self, candidates: Sequence[str], prompt: str | None = None, *,
                     messages: Sequence[Mapping[str, str]] | None = None, model: str | None = None,
                     timeout: float | None = None, request_id: str | None = None) -> RankedResult:
        body = {**context_body(prompt, messages, model or self.model), "candidates": list(candidates)}
        return await self._call(*self._ranked_call("rerank", body, timeout, request_id))
