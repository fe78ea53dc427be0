"""Builds the served models from config and runs HTTP (uvicorn) and gRPC (grpc.aio) on one event loop.

One signal/drain path: SIGTERM or SIGINT -> readiness false (HTTP /ready 503, gRPC health NOT_SERVING) and
new work refused -> everything already accepted is answered (up to `grace_s`) -> servers stop -> exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

import uvicorn

from service.config import ServeConfig
from service.engine import RewardEngine
from service.house import ModelHouse
from service.http_api.app import create_app
from service.keys import load_keys

log = logging.getLogger("rewardserve.runtime")


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns signals and drains itself."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def bind_socket(host: str, port: int, what: str = "HTTP", listen: bool = True) -> socket.socket:
    """The HTTP listening socket, bound here so a failed bind stops everything before serving starts.

    It is made with proto IPPROTO_TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on accepted sockets
    whose proto says TCP, and a socket made with proto 0 kept it on, so a response's body waited behind its headers
    for the client's delayed ACK: 40 ms added to every HTTP answer (/health took 44 ms). TCP_NODELAY is also set on
    the listener, which Linux passes on to accepted sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # e.g. the port is taken: a configuration problem, said in one line
        sock.close()
        raise ValueError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None
    if not listen:
        return sock
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def check_ports(config: ServeConfig) -> None:
    """Both ports can be bound now: a taken one is said at once, not after the minutes the models take to load
    (should another process take it meanwhile, binding it for real says so again)."""
    for what, port in (("HTTP", config.port), ("gRPC", config.grpc_port)):
        if port > 0:
            bind_socket(config.host, port, what, listen=False).close()


def environment_warnings(requires_keys: bool, environ: Any = None) -> list[str]:
    """What to warn about in the environment: REWARDSERVE_* names that nothing reads (a typo), and the clients'
    REWARDSERVE_API_KEY set on a server that requires no key (its keys are REWARDSERVE_API_KEYS)."""
    import difflib

    from service.config import ENV_PREFIX, OTHER_ENV

    environ = os.environ if environ is None else environ
    fields = sorted(ENV_PREFIX + name.upper() for name in ServeConfig.model_fields)
    out = []
    for key in sorted(k for k in environ if k.startswith(ENV_PREFIX)):
        if key not in fields and key not in OTHER_ENV:
            close = difflib.get_close_matches(key, fields, n=1)
            out.append(f"{key} is not a setting (ignored)" + (f": did you mean {close[0]}?" if close else ""))
    if environ.get("REWARDSERVE_API_KEY") and not requires_keys:
        out.append("REWARDSERVE_API_KEY is set, but it is the clients' key: this server requires none. Set "
                   "REWARDSERVE_API_KEYS (or --api-keys, --api-key-file) to require keys")
    return out


async def start_best_of_n(house: ModelHouse, config: ServeConfig) -> Any:
    """Best-of-N over the served models, with the configured generator started (after the reward models, so
    that an in-process vLLM's thread settings do not reach the model workers' threads)."""
    from service.bon import BestOfN

    generator = None
    if config.generator:
        from service.generation.registry import create_generator

        generator = create_generator(config.generator, config)
        await generator.start()
        log.info("best-of-n generator: %s", generator.name)
    return BestOfN(house, generator)


class Runtime:
    def __init__(self, config: ServeConfig, house: ModelHouse | None = None):
        self.config = config
        self.house = house
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._http: _UvicornServer | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc: Any = None
        self._health: Any = None
        self._stopped = asyncio.Event()
        self.app: Any = None  # the FastAPI app, once HTTP is up
        self.bon: Any = None  # service.bon.BestOfN, set by start()

    @property
    def engine(self) -> RewardEngine | None:
        """The default model's engine."""
        return self.house.engine if self.house is not None else None

    async def start(self) -> None:
        """Models, generator, gRPC, HTTP, in that order; if any step fails, what was started is stopped again."""
        keys = len(load_keys(self.config.api_keys, self.config.api_key_file))
        for warning in environment_warnings(keys > 0):
            log.warning("%s", warning)
        if self.house is None:
            check_ports(self.config)
            self.house = await asyncio.to_thread(ModelHouse.build, self.config)
        await self.house.start()
        try:
            self.bon = await start_best_of_n(self.house, self.config)
            if self.config.grpc_port >= 0:
                from service.grpc_api.server import start_grpc_server

                self._grpc, self.grpc_port, self._health = await start_grpc_server(
                    self.house, self.config, bon=self.bon)
            await self._start_http()
        except BaseException:
            await self._stop_all()
            raise
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host  # an IPv6 address
        log.info(
            "rewardserve serving %s: HTTP %s://%s:%d  gRPC %s  API keys %s",
            ", ".join(self.house.scorers), "https" if self.config.tls_cert else "http", host,
            self.http_port, f"{host}:{self.grpc_port}" if self.grpc_port else "off",
            f"required ({keys})" if keys else "off (anyone may call)",
        )

    async def _start_http(self) -> None:
        sock = bind_socket(self.config.host, self.config.port)
        self.http_port = sock.getsockname()[1]
        self.app = create_app(self.house, bon=self.bon)
        uv_config = uvicorn.Config(
            self.app, log_level=self.config.log_level.lower(), access_log=False, lifespan="off",
            timeout_graceful_shutdown=self.config.drain_timeout_s, ssl_certfile=self.config.tls_cert,
            ssl_keyfile=self.config.tls_key,
        )
        self._http = _UvicornServer(uv_config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # surface the startup error
            await asyncio.sleep(0.01)

    def _busy(self) -> bool:
        """Work admitted and not yet scored: inputs tokenizing, generating (Best-of-N), queued or computing.
        (Their answers are then written during the servers' own graceful stop, within what is left of the
        drain timeout; requests refused while draining do not count.)"""
        return self.house.depth > 0

    async def drain_and_stop(self, grace_s: float | None = None) -> None:
        """Stop taking work, answer what was accepted (up to drain_timeout_s in all), then stop everything."""
        assert self.house is not None
        self.house.mark_draining()
        if self._health is not None:
            await self._health.set_all_not_serving()
        loop = asyncio.get_running_loop()
        end = loop.time() + (grace_s if grace_s is not None else self.config.drain_timeout_s)
        while self._busy() and loop.time() < end:
            await asyncio.sleep(0.01)
        if self._http is not None:
            self._http.config.timeout_graceful_shutdown = max(0.1, end - loop.time())
        await self._stop_all(max(0.0, end - loop.time()))

    async def _stop_all(self, grace_s: float = 0.0) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                with contextlib.suppress(Exception):
                    await self._http_task
        if self.house is not None:
            await self.house.stop()
        if self.bon is not None and self.bon.generator is not None:
            await asyncio.to_thread(self.bon.generator.close)
        self._stopped.set()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await stop_requested.wait()
        log.info("signal received: draining")
        await self.drain_and_stop()
        log.info("stopped")


def configure_process(config: ServeConfig) -> None:
    """Process-wide settings, made once and in the open: torch's intra-op threads (the model worker's), and
    bounded native memory (service/memory.py: first, the process re-executes itself under jemalloc when that is
    installed; shape-keyed kernel caches capped before the first matmul; on glibc, free pages trimmed)."""
    from service.memory import bound_kernel_caches, start_trimmer, use_jemalloc

    use_jemalloc()
    import torch

    from service.backends.hf_backend import available_cores

    torch.set_num_threads(int(config.threads) if config.threads > 0 else available_cores())
    bound_kernel_caches()
    start_trimmer()


def serve(config: ServeConfig) -> None:
    configure_process(config)
    asyncio.run(Runtime(config).serve_forever())
