"""Clients for a rewardserve server over HTTP and gRPC, blocking and asyncio; they need only httpx, grpcio and
protobuf. See docs/clients.md."""

from .errors import (
    AuthenticationError, ClientClosedError, DeadlineExceededError, InvalidInputError, NotFoundError, OverloadedError,
    PayloadTooLargeError, RewardClientError, ServerError, UnavailableError,
)
from .grpc_client import AsyncGrpcRewardClient, GrpcRewardClient
from .http_client import AsyncRewardClient, RewardClient
from .types import ModelInfo, ScoreResult
from .ranking import RankedCandidate, RankedResult

__all__ = [
    "RewardClient", "AsyncRewardClient", "GrpcRewardClient", "AsyncGrpcRewardClient",
    "ScoreResult", "ModelInfo", "RankedResult", "RankedCandidate",
    "RewardClientError", "InvalidInputError", "NotFoundError", "PayloadTooLargeError", "AuthenticationError",
    "OverloadedError", "UnavailableError", "DeadlineExceededError", "ServerError", "ClientClosedError",
]

# Adapters for RL trainers (docs/integrations.md); verl and OpenRLHF load clients/verl_reward.py and
# clients/openrlhf_reward.py by path.
from .trl_adapter import make_async_trl_reward_func, make_trl_reward_func  # noqa: E402

__all__ += ["make_trl_reward_func", "make_async_trl_reward_func"]
