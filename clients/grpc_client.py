"""gRPC clients: `GrpcRewardClient` (blocking) and `AsyncGrpcRewardClient` (grpc.aio).

One channel per target. The call's time left is the gRPC deadline (the server's deadline too); the API key
goes in metadata `authorization: Bearer <key>`. A single `dns:///name:port` target with channel option
("grpc.lb_policy_name", "round_robin") balances over every address the name resolves to (e.g. the pods
behind a headless Kubernetes service) inside gRPC itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc

from .base import PROBE_TIMEOUT_S, AsyncClient, SyncClient
from .loops import PerLoop
from .errors import InvalidInputError, RewardClientError, grpc_error
from .types import ModelInfo, ScoreResult, check_count
from .grpc_ranking import ranked_request, reply_as_json
from .ranking import AsyncRanking, RankedResult, SyncRanking, parse_ranked
from .wire import proto_message, reward_pb2, reward_pb2_grpc

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVICE_NAME = "rewardserve.v1.RewardService"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
USER_AGENT = "rewardserve-client/0.1"
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


# ---- requests -----------------------------------------------------------------------------------------
def to_proto(index: int, item: Mapping[str, Any]) -> reward_pb2.ScoreInput:
    """One input (server JSON form) as a ScoreInput; a shape protobuf cannot carry is InvalidInputError. Any form
    may carry a `reference` (for an ensemble's answer rule)."""
    keys = set(item) - {"reference"}
    reference = {"reference": item["reference"]} if item.get("reference") is not None else {}
    try:
        if keys == {"raw"}:
            return reward_pb2.ScoreInput(raw=item["raw"], **reference)
        if keys in ({"prompt", "response"}, {"prompt", "response", "step_separator"}):
            pair = reward_pb2.PromptResponse(prompt=item["prompt"], response=item["response"],
                                             step_separator=item.get("step_separator") or "")
            return reward_pb2.ScoreInput(pair=pair, **reference)
        if keys == {"prompt", "steps"}:
            steps = reward_pb2.Steps(prompt=item["prompt"], steps=list(item["steps"]))
            return reward_pb2.ScoreInput(steps=steps, **reference)
        if keys == {"messages"}:
            messages = [proto_message(message) for message in item["messages"]]
            return reward_pb2.ScoreInput(conversation=reward_pb2.Conversation(messages=messages), **reference)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"inputs.{index}: {exc}", type="invalid_argument") from None
    raise InvalidInputError(
        f"inputs.{index}: an input has the keys 'prompt' and 'response', or 'messages', or 'raw', or 'prompt' and "
        f"'steps'; got {sorted(keys)}", type="invalid_argument")


def score_request(chunk: Sequence[reward_pb2.ScoreInput], request_id: str, normalize: bool,
                  model: str | None) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(model=model or "", inputs=chunk, request_id=request_id, normalize=normalize)


def credentials(tls: bool, ca_cert: str | None, client_cert: str | None,
                client_key: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (CA, client key and certificate are PEM file paths), or None for plaintext."""
    if not (tls or ca_cert or client_cert):
        return None

    def read(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(ca_cert), read(client_key), read(client_cert))


def open_channel(module: Any, target: str, creds: grpc.ChannelCredentials | None, options: list) -> Any:
    """A channel from `grpc` or `grpc.aio` (same signatures)."""
    if creds is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, creds, options=options)


RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 1000))
"""gRPC's own reconnect backoff grows to 120 s, so a channel to a restarted server stayed failing ~10 s after it was
ready (HTTP reconnects at once); capped at 1 s, a restart costs at most a second (`channel_options` override)."""

ERROR_TYPE_KEY = "rewardserve-error-type"
"""The trailing metadata in which the server names an error's kind (service/error_map.py: ERROR_TYPE_METADATA)."""


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


# ---- answers ------------------------------------------------------------------------------------------
def rpc_error(exc: grpc.RpcError, endpoint: str) -> RewardClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    kind = next((str(v) for k, v in trailing or () if k == ERROR_TYPE_KEY), None)
    return grpc_error(code.name, details or "", endpoint, kind)


def parse_reply(reply: reward_pb2.ScoreResponse, endpoint: str, expected: int) -> list[ScoreResult]:
    if reply.HasField("error"):  # only ScoreStream answers set it; handled the same way if one does
        raise grpc_error(CODE_NAMES.get(reply.error.code, "UNKNOWN"), reply.error.message, endpoint,
                         reply.error.type or None)
    results = [
        ScoreResult(s.reward, s.truncated, s.tokens, s.normalized if s.HasField("normalized") else None,
                    list(s.step_rewards) or None, dict(s.members) or None, s.std if s.HasField("std") else None)
        for s in reply.scores
    ]
    return check_count(results, expected, endpoint)


def parse_models(reply: reward_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(m.id, m.max_model_len,
                  (m.normalization.mean, m.normalization.std) if m.HasField("normalization") else None,
                  m.kind or "model", dict(m.members) or None)
        for m in reply.models
    ]


# ---- grpc.health.v1 without grpcio-health-checking: both messages are one field 1 -------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def encode_health_request(service: str) -> bytes:
    """HealthCheckRequest {string service = 1;}"""
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_health_status(data: bytes) -> int:
    """HealthCheckResponse {ServingStatus status = 1;} -> the status number (0 when absent)."""
    status, i = 0, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            status = value if field == 1 else status
        elif wire == 2:
            length, i = _read_varint(data, i)
            i += length
        else:  # fixed64 / fixed32: not in this message, skip them anyway
            i += 8 if wire == 1 else 4
    return status


def health_check(channel: Any) -> Any:
    return channel.unary_unary(HEALTH_CHECK, request_serializer=encode_health_request,
                               response_deserializer=decode_health_status)


# ---- clients ------------------------------------------------------------------------------------------
def grpc_targets(targets: str | Sequence[str], tls: bool) -> tuple[list[str], bool]:
    """Targets as gRPC takes them (`host:port`, `dns:///name:port`), and whether TLS is on: a `grpc://` prefix is
    dropped, `grpcs://` also turns TLS on; an HTTP URL is refused (it is RewardClient's)."""
    out = []
    for target in [targets] if isinstance(targets, str) else list(targets):
        if target.startswith(("http://", "https://")):
            raise ValueError(f"a gRPC target is host:port (or grpc://host:port, grpcs:// for TLS), got {target!r}: "
                             "for an HTTP URL use RewardClient")
        for scheme, secure in (("grpc://", False), ("grpcs://", True)):
            if target.startswith(scheme):
                target, tls = target[len(scheme):].rstrip("/"), tls or secure
        out.append(target)
    return out, tls


class _GrpcSettings:
    def _grpc_settings(self, tls: bool, ca_cert: str | None, client_cert: str | None, client_key: str | None,
                       channel_options: Sequence[tuple[str, Any]]) -> None:
        self._creds = credentials(tls, ca_cert, client_cert, client_key)
        self._options = [("grpc.primary_user_agent", USER_AGENT), *RECONNECT, *channel_options]
        self._metadata = auth_metadata(self.api_key)  # type: ignore[attr-defined]

    def _prepare(self, items: list[dict[str, Any]]) -> list[reward_pb2.ScoreInput]:
        return [to_proto(i, item) for i, item in enumerate(items)]


class GrpcRewardClient(_GrpcSettings, SyncRanking, SyncClient):
    """Blocking gRPC client. `targets`: one "host:port" (or "dns:///name:port"; a grpc:// prefix is taken, and
    grpcs:// means TLS) or several (round-robin with failover). Options as for RewardClient, and: tls (True: TLS with the system CAs), ca_cert, client_cert,
    client_key (PEM paths; any of them turns TLS on), channel_options (extra grpc channel options)."""

    def __init__(self, targets: str | Sequence[str], *, tls: bool = False, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (), **options: Any):
        targets, tls = grpc_targets(targets, tls)
        super().__init__(targets, **options)
        self._grpc_settings(tls, ca_cert, client_cert, client_key, channel_options)
        self._open_channels()

    def _open_channels(self) -> None:
        self._channels = {t: open_channel(grpc, t, self._creds, self._options) for t in self.pool.endpoints}
        self._stubs = {t: reward_pb2_grpc.RewardServiceStub(ch) for t, ch in self._channels.items()}

    def _reopen(self) -> None:
        self._open_channels()  # the parent's channels are left to gRPC's own fork handling

    def _score_once(self, endpoint: str, remaining: float | None, *, chunk: Sequence[reward_pb2.ScoreInput],
                    request_id: str, normalize: bool, model: str | None) -> list[ScoreResult]:
        request = score_request(chunk, request_id, normalize, model)
        try:
            reply = self._stubs[endpoint].Score(request, timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, endpoint) from exc
        return parse_reply(reply, endpoint, len(chunk))

    def _models_once(self, endpoint: str, remaining: float | None) -> list[ModelInfo]:
        try:
            reply = self._stubs[endpoint].ListModels(reward_pb2.ListModelsRequest(), timeout=remaining,
                                                     metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, endpoint) from exc
        return parse_models(reply)

    def _ranked_once(self, endpoint: str, remaining: float | None, *, kind: str, body: dict,
                     request_id: str) -> RankedResult:
        call = self._stubs[endpoint].Rerank if kind == "rerank" else self._stubs[endpoint].BestOfN
        try:
            reply = call(ranked_request(kind, body, request_id), timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, endpoint) from exc
        return parse_ranked(reply_as_json(reply), endpoint)

    def _probe(self, endpoint: str, ready: bool) -> bool:
        try:
            status = health_check(self._channels[endpoint])(SERVICE_NAME if ready else "",
                                                            timeout=PROBE_TIMEOUT_S, metadata=self._metadata)
        except grpc.RpcError:
            return False
        return status == SERVING or not ready  # alive: it answered at all

    def close(self) -> None:
        self._closed = True
        for channel in self._channels.values():
            channel.close()


class AsyncGrpcRewardClient(_GrpcSettings, AsyncRanking, AsyncClient):
    """asyncio gRPC client (grpc.aio); options as for GrpcRewardClient, plus max_concurrency. Its channels
    are opened on first use in each event loop and closed when that loop ends (clients/loops.py)."""

    def __init__(self, targets: str | Sequence[str], *, tls: bool = False, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (), **options: Any):
        targets, tls = grpc_targets(targets, tls)
        super().__init__(targets, **options)
        self._grpc_settings(tls, ca_cert, client_cert, client_key, channel_options)
        self._loop_channels = PerLoop(self._open_channels, close_channels)

    def _open_channels(self) -> dict[str, grpc.aio.Channel]:
        return {t: open_channel(grpc.aio, t, self._creds, self._options) for t in self.pool.endpoints}

    async def _channel(self, endpoint: str) -> grpc.aio.Channel:
        return (await self._loop_channels.get())[endpoint]

    async def _stub(self, endpoint: str) -> reward_pb2_grpc.RewardServiceStub:
        return reward_pb2_grpc.RewardServiceStub(await self._channel(endpoint))

    async def _score_once(self, endpoint: str, remaining: float | None, *,
                          chunk: Sequence[reward_pb2.ScoreInput], request_id: str, normalize: bool,
                          model: str | None) -> list[ScoreResult]:
        request = score_request(chunk, request_id, normalize, model)
        try:
            reply = await (await self._stub(endpoint)).Score(request, timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, endpoint) from exc
        return parse_reply(reply, endpoint, len(chunk))

    async def _models_once(self, endpoint: str, remaining: float | None) -> list[ModelInfo]:
        try:
            stub = await self._stub(endpoint)
            reply = await stub.ListModels(reward_pb2.ListModelsRequest(), timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, endpoint) from exc
        return parse_models(reply)

    async def _ranked_once(self, endpoint: str, remaining: float | None, *, kind: str, body: dict,
                           request_id: str) -> RankedResult:
        stub = await self._stub(endpoint)
        call = stub.Rerank if kind == "rerank" else stub.BestOfN
        try:
            reply = await call(ranked_request(kind, body, request_id), timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, endpoint) from exc
        return parse_ranked(reply_as_json(reply), endpoint)

    async def _probe(self, endpoint: str, ready: bool) -> bool:
        try:
            status = await health_check(await self._channel(endpoint))(SERVICE_NAME if ready else "",
                                                                 timeout=PROBE_TIMEOUT_S, metadata=self._metadata)
        except grpc.RpcError:
            return False
        return status == SERVING or not ready

    async def close(self) -> None:
        self._closed = True
        await self._loop_channels.aclose()


async def close_channels(channels: Mapping[str, Any]) -> None:
    for channel in channels.values():
        await channel.close()
