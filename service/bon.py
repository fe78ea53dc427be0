"""Best-of-N and rerank, transport-free: generate N candidates with the policy, score all N as ONE engine
request (the engine sees N inputs sharing one prompt and scores them as a prefix group), rank best first.

The generator renders the context with the POLICY's chat template; the reward model scores (context,
candidate) through the engine's normal input path, with the RM's own template: a candidate's reward is
exactly what /v1/score answers for the same pair.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from service.errors import ErrorKind, RewardServeError, invalid
from service.generation.base import Generation, Sampling, generator_error
from service.schemas import BestOfNRequest, RankedCandidate, RerankRequest, ScoreResult

log = logging.getLogger("rewardserve.bon")


@dataclass
class RankedOutcome:
    model: str
    candidates: list[RankedCandidate]  # best first
    generation_s: float
    queue_s: float
    compute_s: float
    generator: str | None = None

    @property
    def best(self) -> RankedCandidate:
        return self.candidates[0]


def rank(texts: Sequence[str], results: Sequence[ScoreResult], reasons: Sequence[str | None]) -> list[RankedCandidate]:
    """Candidates sorted by reward, highest first; equal rewards keep their original order."""
    order = sorted(range(len(texts)), key=lambda i: (-results[i].reward, i))
    return [
        RankedCandidate(
            text=texts[i], reward=results[i].reward, rank=r + 1, index=i, truncated=results[i].truncated,
            tokens=results[i].tokens, finish_reason=reasons[i], step_rewards=results[i].step_rewards,
            members=results[i].members, std=results[i].std,
        )
        for r, i in enumerate(order)
    ]


def aggregate_steps(steps: Sequence[float], how: str) -> float:
    """One number from a process reward model's step scores (raw log-odds): the last, the min, the mean, or
    `product`: the log of the product of the steps' probabilities, sum(log sigmoid(s)) (ranks as the product)."""
    if how == "last":
        return float(steps[-1])
    if how == "min":
        return float(min(steps))
    if how == "mean":
        return float(sum(steps) / len(steps))
    return float(sum(-math.log1p(math.exp(-s)) if s > -30 else s for s in steps))


class BestOfN:
    """Holds the served models and the (optional) generator; both transports call it."""

    def __init__(self, house: Any, generator: Any = None):
        self.house = house
        self.generator = generator
        self.config = house.config

    def check_limits(self, request: BestOfNRequest) -> None:
        cfg = self.config
        if request.n > cfg.max_n:
            raise invalid(f"n: {request.n} is more than this server's max_n={cfg.max_n}")
        if request.max_tokens > cfg.max_new_tokens:
            limit = cfg.max_new_tokens
            raise invalid(f"max_tokens: {request.max_tokens} is more than this server's max_new_tokens={limit}")

    def generation_deadline(self, deadline: float | None) -> float:
        own = time.monotonic() + self.config.generation_timeout_s
        return own if deadline is None else min(own, deadline)

    async def best_of_n(self, request: BestOfNRequest, deadline: float | None = None) -> RankedOutcome:
        if self.generator is None:
            raise RewardServeError(
                ErrorKind.NOT_IMPLEMENTED,
                "best-of-n needs a generator: start the server with --generator vllm:PATH | openai:URL | hf:PATH",
            )
        scorer = self.house.resolve(request.model)
        self.check_limits(request)
        sampling = Sampling(
            n=request.n, temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
            seed=request.seed,
        )
        # the candidates' queue room is taken before generating: generation counts against max_queue, and the
        # drain waits for it
        with scorer.admit(request.n, field="n") as reservation:
            start = time.perf_counter()
            generations = await self._generate(request, sampling, deadline)
            generation_s = time.perf_counter() - start
            if len(generations) != request.n:  # a generator bug, not the caller's
                raise RewardServeError(
                    ErrorKind.GENERATOR, f"the generator returned {len(generations)} candidates for n={request.n}"
                )
            texts = [g.text for g in generations]
            outcome = await self._score(scorer, request, texts, [g.finish_reason for g in generations], deadline,
                                        reservation)
        outcome.generation_s = generation_s
        outcome.generator = self.generator.name
        return outcome

    async def _generate(self, request: BestOfNRequest, sampling: Sampling, deadline: float | None) -> list[Generation]:
        try:
            return await self.generator.generate(request.conversation(), sampling, self.generation_deadline(deadline))
        except RewardServeError as exc:
            if exc.kind == ErrorKind.DEADLINE and (deadline is None or deadline > time.monotonic()):
                timeout = self.config.generation_timeout_s
                message = f"generation took longer than generation_timeout_s={timeout}"
                raise RewardServeError(ErrorKind.DEADLINE, message) from None
            raise
        except Exception as exc:  # whatever a generator raises, the caller gets a typed error
            log.exception("generator %s failed", self.generator.name)
            raise generator_error(self.generator.name, exc) from exc

    async def rerank(self, request: RerankRequest, deadline: float | None = None) -> RankedOutcome:
        scorer = self.house.resolve(request.model)
        with scorer.admit(len(request.candidates), field="candidates") as reservation:  # released however it ends
            return await self._score(scorer, request, request.candidates, [None] * len(request.candidates),
                                     deadline, reservation)

    async def _score(self, scorer: Any, request: BestOfNRequest | RerankRequest, texts: Sequence[str],
                     reasons: Sequence[str | None], deadline: float | None, reservation: Any) -> RankedOutcome:
        inputs = [request.scored_input(t) for t in texts]  # one request: the engine groups the shared prompt
        # on the reservation taken at admission: admitted before any drain began, so finished, not refused
        scored = await scorer.score(inputs, deadline=deadline, reservation=reservation, field="candidates")
        if request.aggregate is not None or any(r.step_rewards for r in scored.results):
            how = request.aggregate or "last"
            for r in scored.results:
                if r.step_rewards is None:
                    raise invalid(f"aggregate: model {scored.model!r} has no step scores to aggregate")
                r.reward = aggregate_steps(r.step_rewards, how)
        return RankedOutcome(scored.model, rank(texts, scored.results, reasons), 0.0, scored.queue_s, scored.compute_s)
