"""The gRPC server: RewardService (with a deserializer that types undecodable bytes), health, reflection, TLS."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos import reward_pb2, reward_pb2_grpc
from service.config import ServeConfig
from service.house import ModelHouse
from service.grpc_api.auth import AuthInterceptor
from service.grpc_api.codecs import safe_deserializer
from service.grpc_api.servicer import RewardServicer
from service.keys import key_checker

log = logging.getLogger("rewardserve.grpc")

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name  # "rewardserve.v1.RewardService"


class HealthReporter:
    """The standard grpc.health.v1 service, with the one switch the runtime needs."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def set_all_serving(self) -> None:
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def set_all_not_serving(self) -> None:
        """Every service NOT_SERVING, for good (the server is draining)."""
        await self.servicer.enter_graceful_shutdown()


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from config (mutual TLS when tls_client_ca is set), or None for plaintext."""
    if not config.tls_cert:
        return None
    with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if config.tls_client_ca:
        with open(config.tls_client_ca, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class _CaptureHandlers:
    """Stands in for a server to catch the method-handler table the generated code builds."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def add_reward_service(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with request deserializers that turn undecodable bytes into
    MalformedRequest (-> INVALID_ARGUMENT) instead of grpc's UNKNOWN."""
    capture = _CaptureHandlers()
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, capture)
    handlers = {
        name: handler._replace(request_deserializer=safe_deserializer(handler.request_deserializer))
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def start_grpc_server(
    house: ModelHouse, config: ServeConfig, bon: Any = None
) -> tuple[grpc.aio.Server, int, HealthReporter]:
    """Start RewardService + health + reflection on config.host:config.grpc_port (0: a free port).
    `bon`: the service.bon.BestOfN for BestOfN / Rerank (by default one without a generator)."""
    limit = config.max_body_bytes
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(key_checker(config))],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                 ("grpc.so_reuseport", 0)],  # a port another process listens on is refused, not shared with it
    )
    add_reward_service(RewardServicer(house, bon), server)
    health = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.grpc_port}"
    bind = f"[{config.host}]:{config.grpc_port}" if ":" in config.host else address
    credentials = server_credentials(config)
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError:  # grpcio raises "Failed to bind to address ..." (older versions return 0)
        port = 0
    if port == 0:
        raise ValueError(f"cannot listen for gRPC on {address}: the address is in use or not available")
    await server.start()
    await health.set_all_serving()
    log.info("gRPC serving %s on %s:%d", SERVICE_NAME, config.host, port)
    return server, port, health
