"""Clients for a rewardserve server over HTTP and gRPC, blocking and asyncio; they need only httpx, grpcio and
protobuf. See docs/clients.md."""

from clients.errors import (
    AuthenticationError, DeadlineExceededError, InvalidInputError, NotFoundError, OverloadedError,
    PayloadTooLargeError, RewardClientError, ServerError, UnavailableError,
)
from clients.grpc_client import AsyncGrpcRewardClient, GrpcRewardClient
from clients.http_client import AsyncRewardClient, RewardClient
from clients.types import ModelInfo, ScoreResult

__all__ = [
    "RewardClient", "AsyncRewardClient", "GrpcRewardClient", "AsyncGrpcRewardClient",
    "ScoreResult", "ModelInfo",
    "RewardClientError", "InvalidInputError", "NotFoundError", "PayloadTooLargeError", "AuthenticationError",
    "OverloadedError", "UnavailableError", "DeadlineExceededError", "ServerError",
]
