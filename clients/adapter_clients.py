"""How the trainer adapters open clients: `open_client` (either transport, blocking or asyncio), and for the
file-loaded adapters (clients/verl_reward.py, clients/openrlhf_reward.py) the configuration from REWARDSERVE_*
variables (or the trainer's keyword arguments) with one blocking client per process and configuration.

verl and OpenRLHF load those files by path under a module name no other process can import, so Ray pickles
their functions by value, module globals included. The client cache therefore lives here, in a module that is
imported by name (pickled by reference, never copied): every unpickled copy of a reward function in a process
finds the same clients. Clients are keyed by process id, so a forked child opens its own.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

ENV_URL = "REWARDSERVE_URL"
ENV_API_KEY = "REWARDSERVE_API_KEY"
ENV_TIMEOUT = "REWARDSERVE_TIMEOUT"
ENV_TRANSPORT = "REWARDSERVE_TRANSPORT"
DEFAULT_TIMEOUT = 60.0
GRPC_SCHEME = "grpc://"
TRANSPORTS = ("http", "grpc")

_clients: dict[tuple, Any] = {}
_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a lock held by another thread at fork time would never be released in the child


os.register_at_fork(after_in_child=_after_fork)


def transport_of(urls: Sequence[str]) -> str:
    """`http` when every URL is http(s)://, `grpc` when none is; a mix is an error."""
    http = [u.startswith(("http://", "https://")) for u in urls]
    if all(http):
        return "http"
    if not any(http):
        return "grpc"
    raise ValueError(f"{ENV_URL} mixes HTTP URLs and gRPC targets: {urls}")


def settings(url: str | Sequence[str] | None = None, api_key: str | None = None,
             timeout: float | str | None = None,
             transport: str | None = None) -> tuple[tuple[str, ...], str, str | None, float | None]:
    """(urls, transport, api_key, timeout) from the arguments, else the REWARDSERVE_* environment."""
    raw = url if url is not None else os.environ.get(ENV_URL, "")
    urls = tuple(u.strip() for u in (raw.split(",") if isinstance(raw, str) else raw) if u.strip())
    if not urls:
        raise ValueError(f"set {ENV_URL} (e.g. http://rm-host:8000) or pass url= in reward_kwargs")
    transport = transport or os.environ.get(ENV_TRANSPORT) or transport_of(urls)
    if transport == "grpc":
        urls = tuple(u[len(GRPC_SCHEME):] if u.startswith(GRPC_SCHEME) else u for u in urls)
    api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)
    timeout = timeout if timeout is not None else os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT)
    timeout_s = None if str(timeout).lower() in ("", "none", "0") else float(timeout)
    return urls, transport, api_key, timeout_s


def open_client(url_or_urls: str | Sequence[str], *, transport: str = "http", asynchronous: bool = False,
                **options: Any) -> Any:
    """A RewardClient / GrpcRewardClient (or their asyncio twins) for `url_or_urls`."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport is one of {TRANSPORTS}, got {transport!r}")
    if transport == "grpc":
        from .grpc_client import AsyncGrpcRewardClient, GrpcRewardClient

        cls: Any = AsyncGrpcRewardClient if asynchronous else GrpcRewardClient
    else:
        from .http_client import AsyncRewardClient, RewardClient

        cls = AsyncRewardClient if asynchronous else RewardClient
    return cls(url_or_urls, **options)


def client_from_env(url: str | Sequence[str] | None = None, api_key: str | None = None,
                    timeout: float | str | None = None, transport: str | None = None) -> Any:
    """A blocking client for the configured server, opened once per process and configuration."""
    urls, transport, api_key, timeout_s = settings(url, api_key, timeout, transport)
    key = (os.getpid(), urls, transport, api_key, timeout_s)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = open_client(list(urls), transport=transport, api_key=api_key,
                                                  timeout=timeout_s)
        return client
