"""gRPC transport: protobuf <-> engine, nothing else. Errors are translated here with error_map.GRPC_STATUS.

The servicer never catches CancelledError: when a client cancels (or its deadline passes) grpc.aio cancels
the handler task, the cancellation reaches `engine.score`, and the engine cancels the queued inputs' futures
so the batcher skips them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from protos import reward_pb2, reward_pb2_grpc
from service import metrics
from service.auth import AuthInterceptor, key_checker
from service.config import ServeConfig
from service.engine import RewardEngine, ScoreOutcome
from service.error_map import GRPC_STATUS
from service.errors import ErrorKind, RewardServeError, invalid
from service.schemas import parse_inputs

log = logging.getLogger("rewardserve.grpc")

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name  # "rewardserve.v1.RewardService"

# Stream errors that end the whole stream (the request itself is wrong); others are answered in-band.
STREAM_FATAL = frozenset({ErrorKind.INVALID_ARGUMENT, ErrorKind.NOT_FOUND, ErrorKind.PAYLOAD_TOO_LARGE})


# ---- protobuf -> engine --------------------------------------------------------------------------------
def input_to_dict(index: int, inp: reward_pb2.ScoreInput) -> dict[str, Any]:
    """One ScoreInput as the plain dict `parse_inputs` validates (same rules as the HTTP body)."""
    form = inp.WhichOneof("input")
    if form == "pair":
        return {"prompt": inp.pair.prompt, "response": inp.pair.response}
    if form == "conversation":
        return {"messages": [{"role": m.role, "content": m.content} for m in inp.conversation.messages]}
    if form == "raw":
        return {"raw": inp.raw}
    raise invalid(f"inputs.{index}: no input set: set one of pair, conversation or raw")


class MalformedRequest:
    """What a request that does not parse as its protobuf message becomes; answered INVALID_ARGUMENT."""

    def __init__(self, error: str):
        self.error = error
        self.request_id = ""


def _safe_deserializer(parse: Any) -> Any:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:  # grpc would answer UNKNOWN: it is the client's bytes that are wrong
            return MalformedRequest(str(exc))

    return deserialize


def check_parsed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise invalid(f"malformed request message: {request.error}")


def decode_inputs(request: reward_pb2.ScoreRequest) -> list:
    check_parsed(request)
    if not request.inputs:
        raise invalid("inputs is empty: send at least one input")
    return parse_inputs([input_to_dict(i, inp) for i, inp in enumerate(request.inputs)])


def engine_deadline(engine: RewardEngine, context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as an engine (monotonic) deadline; without one the configured default."""
    remaining = context.time_remaining()
    if remaining is None:
        return engine.deadline_from_timeout(None)
    return time.monotonic() + max(0.0, remaining)


# ---- engine -> protobuf --------------------------------------------------------------------------------
def encode_outcome(outcome: ScoreOutcome, request_id: str, sequence: int = 0) -> reward_pb2.ScoreResponse:
    scores = [
        reward_pb2.ScoreResult(reward=r.reward, truncated=r.truncated, tokens=r.tokens, normalized=r.normalized)
        for r in outcome.results
    ]
    return reward_pb2.ScoreResponse(model=outcome.model, scores=scores, request_id=request_id, sequence=sequence)


def encode_error(
    engine: RewardEngine, exc: RewardServeError, request_id: str, sequence: int
) -> reward_pb2.ScoreResponse:
    code = GRPC_STATUS[exc.kind].value[0]
    error = reward_pb2.RequestError(code=code, message=exc.message)
    return reward_pb2.ScoreResponse(model=engine.name, request_id=request_id, sequence=sequence, error=error)


def timing_metadata(outcome: ScoreOutcome) -> tuple[tuple[str, str], ...]:
    return (
        ("x-queue-time-ms", f"{outcome.queue_s * 1000:.3f}"),
        ("x-compute-time-ms", f"{outcome.compute_s * 1000:.3f}"),
    )


# ---- metrics ------------------------------------------------------------------------------------------
class _Observed:
    """Counts one request: in-flight while inside, then latency and REQUESTS{code} on exit.

    The code is OK unless `fail` set another. A CancelledError leaving the block means grpc.aio gave up the
    call: DEADLINE_EXCEEDED if its deadline has passed, else CANCELLED (the client went away).
    """

    def __init__(self, method: str, context: grpc.aio.ServicerContext):
        self.method = method
        self.context = context
        self.code: grpc.StatusCode | None = None

    def fail(self, code: grpc.StatusCode) -> None:
        self.code = code

    def __enter__(self) -> "_Observed":
        self.start = time.perf_counter()
        metrics.IN_FLIGHT.labels("grpc").inc()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        metrics.IN_FLIGHT.labels("grpc").dec()
        code = self.code or (grpc.StatusCode.OK if exc_type is None else self._code_of(exc_type))
        metrics.REQUESTS.labels("grpc", self.method, code.name).inc()
        metrics.REQUEST_LATENCY.labels("grpc", self.method).observe(time.perf_counter() - self.start)

    def _code_of(self, exc_type: type) -> grpc.StatusCode:
        if not issubclass(exc_type, asyncio.CancelledError):
            return grpc.StatusCode.UNKNOWN
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


# ---- the service --------------------------------------------------------------------------------------
class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, engine: RewardEngine, bon: Any = None):
        from service.bon import BestOfN

        self.engine = engine
        self.bon = bon if bon is not None else BestOfN(engine)  # Best-of-N / rerank (generator optional)

    async def _score(self, request: reward_pb2.ScoreRequest, deadline: float | None) -> ScoreOutcome:
        inputs = decode_inputs(request)
        return await self.engine.score(
            inputs, model=request.model or None, deadline=deadline, normalize=request.normalize
        )

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> Any:
        with _Observed("Score", context) as obs:
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
        from service import bon_grpc

        with _Observed(method, context) as obs:
            try:
                check_parsed(request)
                deadline = engine_deadline(self.engine, context)
                if method == "BestOfN":
                    outcome = await self.bon.best_of_n(bon_grpc.decode_best_of_n(request), deadline)
                else:
                    outcome = await self.bon.rerank(bon_grpc.decode_rerank(request), deadline)
            except RewardServeError as exc:
                obs.fail(GRPC_STATUS[exc.kind])
                await context.abort(GRPC_STATUS[exc.kind], exc.message)
            except Exception as exc:  # not BaseException: CancelledError must reach grpc.aio
                log.exception("%s failed", method)
                obs.fail(grpc.StatusCode.INTERNAL)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            context.set_trailing_metadata(bon_grpc.timing_metadata(outcome))
            encode = bon_grpc.encode_best_of_n if method == "BestOfN" else bon_grpc.encode_rerank
            return encode(outcome, request.request_id)

    async def BestOfN(self, request: reward_pb2.BestOfNRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ranked("BestOfN", request, context)

    async def Rerank(self, request: reward_pb2.RerankRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._ranked("Rerank", request, context)

    async def ScoreStream(self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        await _ScoreStream(self, context).run(request_iterator)

    async def ListModels(self, request: reward_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        with _Observed("ListModels", context) as obs:
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


_END = object()  # queue marker: the client half-closed and every request was answered


class _ScoreStream:
    """One ScoreStream call: a reader task spawns one task per request; answers go out in completion order
    through a queue. A fatal error (see STREAM_FATAL) aborts the call; leaving `run` in any way cancels
    the reader and every request still in flight."""

    def __init__(self, servicer: RewardServicer, context: grpc.aio.ServicerContext):
        self.servicer = servicer
        self.engine = servicer.engine
        self.context = context
        self.out: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()

    async def run(self, request_iterator: AsyncIterator) -> None:
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while (item := await self.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                await self.context.write(item)
        except _StreamAbort as abort:
            await self.context.abort(abort.code, abort.message)
        finally:
            for task in (reader, *self.tasks):
                task.cancel()

    async def _read(self, request_iterator: AsyncIterator) -> None:
        try:
            sequence = 0
            async for request in request_iterator:
                task = asyncio.create_task(self._answer(request, sequence))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                sequence += 1
            while self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.out.put_nowait(_END)
        except Exception as exc:  # a broken read (e.g. the client went away) ends the stream
            self.out.put_nowait(exc)

    async def _answer(self, request: reward_pb2.ScoreRequest, sequence: int) -> None:
        with _Observed("ScoreStream", self.context) as obs:
            try:
                outcome = await self.servicer._score(request, engine_deadline(self.engine, self.context))
                self.out.put_nowait(encode_outcome(outcome, request.request_id, sequence))
            except RewardServeError as exc:
                obs.fail(GRPC_STATUS[exc.kind])
                self.out.put_nowait(self._on_error(exc, request.request_id, sequence))
            except Exception as exc:
                log.exception("ScoreStream request failed")
                obs.fail(grpc.StatusCode.INTERNAL)
                failure = RewardServeError(ErrorKind.BACKEND, f"internal error: {type(exc).__name__}: {exc}")
                self.out.put_nowait(encode_error(self.engine, failure, request.request_id, sequence))

    def _on_error(self, exc: RewardServeError, request_id: str, sequence: int) -> Any:
        if exc.kind in STREAM_FATAL:
            return _StreamAbort(GRPC_STATUS[exc.kind], f"request_id={request_id} sequence={sequence}: {exc.message}")
        return encode_error(self.engine, exc, request_id, sequence)


class _StreamAbort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---- server -------------------------------------------------------------------------------------------
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
        name: handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer))
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def start_grpc_server(
    engine: RewardEngine, config: ServeConfig, bon: Any = None
) -> tuple[grpc.aio.Server, int, HealthReporter]:
    """Start RewardService + health + reflection on config.host:config.grpc_port (0: a free port).
    `bon`: the service.bon.BestOfN for BestOfN / Rerank (by default one without a generator)."""
    limit = config.max_body_bytes
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(key_checker(config))],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    add_reward_service(RewardServicer(engine, bon), server)
    health = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.grpc_port}"
    bind = f"[{config.host}]:{config.grpc_port}" if ":" in config.host else address
    credentials = server_credentials(config)
    port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"gRPC could not bind {address}")
    await server.start()
    await health.set_all_serving()
    log.info("gRPC serving %s on %s:%d", SERVICE_NAME, config.host, port)
    return server, port, health
