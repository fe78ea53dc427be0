"""gRPC RewardService: protobuf <-> engine, nothing else. Errors are translated with error_map.GRPC_STATUS.

The servicer never catches CancelledError: when a client cancels (or its deadline passes) grpc.aio cancels
the handler task, the cancellation reaches `engine.score`, and the engine cancels the queued inputs' futures
so the batcher skips them.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import grpc

from protos import reward_pb2, reward_pb2_grpc
from service.bon import BestOfN
from service.engine import RewardEngine, ScoreOutcome
from service.error_map import GRPC_STATUS
from service.errors import RewardServeError
from service.grpc_api import bon_codecs
from service.grpc_api.calls import Observed
from service.grpc_api.codecs import (
    MalformedRequest, check_parsed, decode_inputs, encode_outcome, engine_deadline, timing_metadata,
)
from service.grpc_api.stream import ScoreStream

log = logging.getLogger("rewardserve.grpc")


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, engine: RewardEngine, bon: Any = None):
        self.engine = engine
        self.bon = bon if bon is not None else BestOfN(engine)  # Best-of-N / rerank (generator optional)

    async def _score(self, request: reward_pb2.ScoreRequest, deadline: float | None) -> ScoreOutcome:
        inputs = decode_inputs(request)
        return await self.engine.score(
            inputs, model=request.model or None, deadline=deadline, normalize=request.normalize
        )

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> Any:
        with Observed("Score", context) as obs:
            try:
                outcome = await self._score(request, engine_deadline(self.engine, context))
            except RewardServeError as exc:
                obs.fail(GRPC_STATUS[exc.kind])
                await context.abort(GRPC_STATUS[exc.kind], exc.message)
            except Exception as exc:  # not BaseException: CancelledError must reach grpc.aio
                log.exception("Score failed")
                obs.fail(grpc.StatusCode.INTERNAL)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            context.set_trailing_metadata(timing_metadata(outcome))
            return encode_outcome(outcome, request.request_id)

    async def _ranked(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """BestOfN and Rerank: decode, run through service.bon, encode; errors as Score's."""
        with Observed(method, context) as obs:
            try:
                check_parsed(request)
                deadline = engine_deadline(self.engine, context)
                if method == "BestOfN":
                    outcome = await self.bon.best_of_n(bon_codecs.decode_best_of_n(request), deadline)
                else:
                    outcome = await self.bon.rerank(bon_codecs.decode_rerank(request), deadline)
            except RewardServeError as exc:
                obs.fail(GRPC_STATUS[exc.kind])
                await context.abort(GRPC_STATUS[exc.kind], exc.message)
            except Exception as exc:  # not BaseException: CancelledError must reach grpc.aio
                log.exception("%s failed", method)
                obs.fail(grpc.StatusCode.INTERNAL)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            context.set_trailing_metadata(bon_codecs.timing_metadata(outcome))
            encode = bon_codecs.encode_best_of_n if method == "BestOfN" else bon_codecs.encode_rerank
            return encode(outcome, request.request_id)

    async def BestOfN(self, request: reward_pb2.BestOfNRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ranked("BestOfN", request, context)

    async def Rerank(self, request: reward_pb2.RerankRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ranked("Rerank", request, context)

    async def ScoreStream(self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        await ScoreStream(self, context).run(request_iterator)

    async def ListModels(self, request: reward_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        with Observed("ListModels", context) as obs:
            if isinstance(request, MalformedRequest):
                obs.fail(grpc.StatusCode.INVALID_ARGUMENT)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.error}")
            engine = self.engine
            stats = engine.stats
            info = reward_pb2.ModelInfo(
                id=engine.name,
                max_model_len=engine.max_length,
                normalization=reward_pb2.RewardStats(mean=stats.mean, std=stats.std) if stats else None,
            )
            return reward_pb2.ListModelsResponse(models=[info])
