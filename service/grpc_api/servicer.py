"""gRPC RewardService: protobuf <-> engine, nothing else. Errors are translated with error_map.GRPC_STATUS.

The servicer never catches CancelledError: when a client cancels (or its deadline passes) grpc.aio cancels
the handler task, the cancellation reaches `engine.score`, and the engine cancels the queued inputs' futures
so the batcher skips them.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from protos import reward_pb2, reward_pb2_grpc
from service.bon import BestOfN
from service.engine import ScoreOutcome
from service.house import ModelHouse
from service.error_map import GRPC_STATUS
from service.grpc_api import bon_codecs
from service.grpc_api.calls import Observed, abort, typed
from service.grpc_api.codecs import (
    check_parsed, decode_groups, decode_inputs, encode_model, encode_outcome, engine_deadline, timing_metadata,
)
from service.grpc_api.stream import ScoreStream

log = logging.getLogger("rewardserve.grpc")


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, house: ModelHouse, bon: Any = None):
        self.house = house
        self.config = house.config
        self.bon = bon if bon is not None else BestOfN(house)  # Best-of-N / rerank (generator optional)

    async def _score(self, request: reward_pb2.ScoreRequest, deadline: float | None) -> ScoreOutcome:
        inputs = decode_inputs(request)
        return await self.house.score(inputs, model=request.model or None, deadline=deadline,
                                      normalize=request.normalize, groups=decode_groups(request))

    async def _call(self, method: str, context: grpc.aio.ServicerContext,
                    work: Callable[[], Awaitable[tuple[Any, tuple]]]) -> Any:
        """Run one unary call: its response and trailing metadata, or the typed error it ends with."""
        with Observed(method, context) as obs:
            try:
                response, metadata = await work()
            except Exception as exc:  # not BaseException: CancelledError must reach grpc.aio
                error = typed(exc, method)
                obs.fail(GRPC_STATUS[error.kind])
                await abort(context, error)
            context.set_trailing_metadata(metadata)
            return response

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> tuple[Any, tuple]:
            outcome = await self._score(request, engine_deadline(self.house, context))
            return encode_outcome(outcome, request.request_id), timing_metadata(outcome)

        return await self._call("Score", context, work)

    async def _ranked(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """BestOfN and Rerank: decode, run through service.bon, encode; errors as Score's."""
        async def work() -> tuple[Any, tuple]:
            check_parsed(request)
            deadline = engine_deadline(self.house, context)
            if method == "BestOfN":
                outcome = await self.bon.best_of_n(bon_codecs.decode_best_of_n(request), deadline)
            else:
                outcome = await self.bon.rerank(bon_codecs.decode_rerank(request), deadline)
            encode = bon_codecs.encode_best_of_n if method == "BestOfN" else bon_codecs.encode_rerank
            return encode(outcome, request.request_id), bon_codecs.timing_metadata(outcome)

        return await self._call(method, context, work)

    async def BestOfN(self, request: reward_pb2.BestOfNRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ranked("BestOfN", request, context)

    async def Rerank(self, request: reward_pb2.RerankRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ranked("Rerank", request, context)

    async def ScoreStream(self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        await ScoreStream(self, context).run(request_iterator)

    async def ListModels(self, request: reward_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> tuple[Any, tuple]:
            check_parsed(request)
            return reward_pb2.ListModelsResponse(models=[encode_model(i) for i in self.house.describe()]), ()

        return await self._call("ListModels", context, work)
