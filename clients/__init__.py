"""Clients for a rewardserve server over HTTP and gRPC, blocking and asyncio; they need only httpx, grpcio and
protobuf. See docs/clients.md."""

from clients.errors import (
    AuthenticationError, DeadlineExceededError, InvalidInputError, NotFoundError, OverloadedError,
    PayloadTooLargeError, RewardClientError, ServerError, UnavailableError,
)
from clients.grpc_client import AsyncGrpcRewardClient, GrpcRewardClient
from clients.http_client import AsyncRewardClient, RewardClient
from clients.types import ModelInfo, ScoreResult
from clients.ranking import RankedCandidate, RankedResult

__all__ = [
    "RewardClient", "AsyncRewardClient", "GrpcRewardClient", "AsyncGrpcRewardClient",
    "ScoreResult", "ModelInfo", "RankedResult", "RankedCandidate",
    "RewardClientError", "InvalidInputError", "NotFoundError", "PayloadTooLargeError", "AuthenticationError",
    "OverloadedError", "UnavailableError", "DeadlineExceededError", "ServerError",
]

# Adapters for RL trainers (docs/integrations.md); verl and OpenRLHF load clients/verl_reward.py and
# clients/openrlhf_reward.py by path.
from clients.trl_adapter import make_async_trl_reward_func, make_trl_reward_func  # noqa: E402

__all__ += ["make_trl_reward_func", "make_async_trl_reward_func"]
