"""A rewardserve server as a TRL `GRPOTrainer` reward function (`reward_funcs=[...]`). See docs/integrations.md.

TRL 1.16 (`GRPOTrainer._calculate_rewards` in trl/trainer/grpo_trainer.py) calls a custom reward function as
`reward_func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)`, where `reward_kwargs` holds the
dataset's other columns plus `trainer_state`, `log_extra` and `log_metric`, and expects one reward per completion
(a float, or None: "not applicable", turned into NaN and left out of that sample's sum). Prompts and completions
are both strings (plain text) or both lists of `{"role", "content"}` messages (conversational; the completion is
`[{"role": "assistant", "content": ...}]`). The metric name is `getattr(func, "__name__", type(func).__name__)`
(`trl.trainer.utils.get_callable_name`): the reward shows up as `rewards/<name>/mean`. A function whose
`__call__` is a coroutine function (`trl.trainer.utils.is_async_callable`) is awaited on TRL's own event loop
thread, concurrently with the other async reward functions: that is `make_async_trl_reward_func`.

Both are callable objects rather than closures: they pickle (TRL's experimental async GRPO trainer sends reward
functions to a spawned process) and open their client lazily, once per process (and, async, per event loop).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Mapping, Sequence

from clients.errors import InvalidInputError, RewardClientError
from clients.types import ScoreResult

TRANSPORTS = ("http", "grpc")
ON_ERROR = ("raise", "none")


# ---- inputs -------------------------------------------------------------------------------------------
def message_text(content: Any) -> str:
    """A message's content as text: a string as is; a list of content parts (`{"type": "text", "text": ...}`)
    joined; None (an assistant turn that only calls tools) as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") if isinstance(part, Mapping) else str(part) for part in content)
    return str(content)


def clean_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages as the server takes them: `role` and `content` only (TRL may add keys such as `tool_calls`)."""
    return [{"role": str(m["role"]), "content": message_text(m.get("content"))} for m in messages]


def trl_input(index: int, prompt: Any, completion: Any) -> dict[str, Any]:
    """One (prompt, completion) pair from TRL as a server input.

    Plain text: `{"prompt": prompt, "response": completion}` (the server renders it with the reward model's own
    template). Conversational: `{"messages": prompt + completion}`.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    if not isinstance(prompt, str) and not isinstance(completion, str):
        return {"messages": clean_messages([*prompt, *completion])}
    raise InvalidInputError(
        f"inputs.{index}: prompt and completion must both be text or both be message lists, got "
        f"{type(prompt).__name__} and {type(completion).__name__}", type="invalid_argument")


def trl_inputs(prompts: Sequence[Any], completions: Sequence[Any]) -> list[dict[str, Any]]:
    if len(prompts) != len(completions):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(completions)} completions",
                                type="invalid_argument")
    return [trl_input(i, p, c) for i, (p, c) in enumerate(zip(prompts, completions))]


# ---- clients ------------------------------------------------------------------------------------------
def open_client(url_or_urls: str | Sequence[str], *, transport: str = "http", asynchronous: bool = False,
                **options: Any) -> Any:
    """A RewardClient / GrpcRewardClient (or their asyncio twins) for `url_or_urls`."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport is one of {TRANSPORTS}, got {transport!r}")
    if transport == "grpc":
        from clients.grpc_client import AsyncGrpcRewardClient, GrpcRewardClient

        cls: Any = AsyncGrpcRewardClient if asynchronous else GrpcRewardClient
    else:
        from clients.http_client import AsyncRewardClient, RewardClient

        cls = AsyncRewardClient if asynchronous else RewardClient
    return cls(url_or_urls, **options)


class _RewardFuncBase:
    """What the sync and async reward functions share: settings, naming, pickling, result handling."""

    def __init__(self, url_or_urls: str | Sequence[str], *, transport: str = "http", api_key: str | None = None,
                 timeout: float | None = 60.0, name: str = "rewardserve", normalize: bool = False,
                 model: str | None = None, on_error: str = "raise", log_truncation: bool = True,
                 **client_options: Any):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport is one of {TRANSPORTS}, got {transport!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error is one of {ON_ERROR}, got {on_error!r}")
        self.urls = url_or_urls if isinstance(url_or_urls, str) else list(url_or_urls)
        self.transport = transport
        self.normalize = normalize
        self.model = model
        self.on_error = on_error
        self.log_truncation = log_truncation
        self.client_options = {"api_key": api_key, "timeout": timeout, **client_options}
        self.__name__ = name  # TRL's metric name: rewards/<name>/mean
        self._lock = threading.Lock()
        self._client: Any = None
        self._owner: Any = None  # the pid (sync) or (pid, event loop) (async) that opened _client

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _client=None, _owner=None)  # a client does not cross processes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.urls!r}, transport={self.transport!r}, name={self.__name__!r})"

    def _score_options(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "model": self.model}

    def _rewards(self, results: list[ScoreResult], log_metric: Any) -> list[float]:
        if self.log_truncation and callable(log_metric) and results:
            log_metric(f"{self.__name__}/truncated", sum(r.truncated for r in results) / len(results))
        if self.normalize:
            return [r.normalized if r.normalized is not None else r.reward for r in results]
        return [r.reward for r in results]

    def _failed(self, count: int, exc: RewardClientError) -> list[float | None]:
        if self.on_error == "raise" or isinstance(exc, InvalidInputError):
            raise exc
        return [None] * count  # TRL: NaN, this function is left out of these samples' rewards


class TrlRewardFunc(_RewardFuncBase):
    """A blocking TRL reward function; see `make_trl_reward_func`."""

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None or self._owner != os.getpid():
                self._client = open_client(self.urls, transport=self.transport, **self.client_options)
                self._owner = os.getpid()
            return self._client

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **reward_kwargs: Any) -> list[float | None]:
        inputs = trl_inputs(prompts, completions)
        try:
            results = self._get_client().score_full(inputs, **self._score_options())
        except RewardClientError as exc:
            return self._failed(len(inputs), exc)
        return self._rewards(results, reward_kwargs.get("log_metric"))

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._owner == os.getpid():
                self._client.close()
            self._client = None


class AsyncTrlRewardFunc(_RewardFuncBase):
    """A coroutine TRL reward function; see `make_async_trl_reward_func`. One client per event loop."""

    def _get_client(self) -> Any:
        owner = (os.getpid(), asyncio.get_running_loop())
        with self._lock:
            if self._client is None or self._owner != owner:
                # A client from another loop cannot be closed from this one; it is dropped.
                self._client = open_client(self.urls, transport=self.transport, asynchronous=True,
                                           **self.client_options)
                self._owner = owner
            return self._client

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **reward_kwargs: Any) -> list[float | None]:
        inputs = trl_inputs(prompts, completions)
        try:
            results = await self._get_client().score_full(inputs, **self._score_options())
        except RewardClientError as exc:
            return self._failed(len(inputs), exc)
        return self._rewards(results, reward_kwargs.get("log_metric"))

    async def aclose(self) -> None:
        """Close the client of the running loop (call it from the loop that used the function)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            await client.close()


def make_trl_reward_func(url_or_urls: str | Sequence[str], *, transport: str = "http", api_key: str | None = None,
                         timeout: float | None = 60.0, **client_options: Any) -> TrlRewardFunc:
    """A reward function for TRL's `GRPOTrainer(reward_funcs=[...])` that scores with a rewardserve server.

    `url_or_urls`: an HTTP base URL (`http://host:8000`) or a gRPC target (`host:50051`), or a list of them
    (round-robin with failover). `transport`: "http" or "grpc". `timeout`: seconds per call, retries included.
    Also: `name` (metric name, default "rewardserve"), `normalize` (return the server's normalized rewards),
    `model`, `on_error` ("raise", default; or "none": a batch the server could not score after the retries gets
    None rewards, which TRL leaves out; invalid input always raises), `log_truncation` (log the fraction of
    truncated inputs as `<name>/truncated` through TRL's `log_metric`, default True), and any client option
    (`max_retries`, `max_batch_size`, TLS, `headers`, `channel_options`, ...; see docs/clients.md).
    """
    return TrlRewardFunc(url_or_urls, transport=transport, api_key=api_key, timeout=timeout, **client_options)


def make_async_trl_reward_func(url_or_urls: str | Sequence[str], *, transport: str = "http",
                               api_key: str | None = None, timeout: float | None = 60.0,
                               **client_options: Any) -> AsyncTrlRewardFunc:
    """As `make_trl_reward_func`, but a coroutine function (asyncio clients). TRL 1.16 runs async reward
    functions on its own event-loop thread, all of them concurrently (`asyncio.gather`): use it to overlap the
    reward server's latency with other async rewards (e.g. an LLM judge). Also usable in your own asyncio loop:
    `await func(prompts=..., completions=...)`."""
    return AsyncTrlRewardFunc(url_or_urls, transport=transport, api_key=api_key, timeout=timeout,
                              **client_options)
