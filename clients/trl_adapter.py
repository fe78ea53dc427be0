"""A rewardserve server as a TRL `GRPOTrainer` reward function (`reward_funcs=[...]`). See docs/integrations.md.

TRL 1.16 (`GRPOTrainer._calculate_rewards` in trl/trainer/grpo_trainer.py) calls a custom reward function as
`reward_func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)`, where `reward_kwargs` holds the
dataset's other columns plus `trainer_state`, `log_extra` and `log_metric`, and expects one reward per completion
(a float, or None: "not applicable", turned into NaN and left out of that sample's sum). Prompts and completions
are both strings (plain text) or both lists of `{"role", "content"}` messages (conversational; the completion is
`[{"role": "assistant", "content": ...}]`, or with tool calling the assistant turns with their `tool_calls` and
the `{"role": "tool", "name", "content"}` results between them: see clients/messages.py). The metric name is `getattr(func, "__name__", type(func).__name__)`
(`trl.trainer.utils.get_callable_name`): the reward shows up as `rewards/<name>/mean`. A function whose
`__call__` is a coroutine function (`trl.trainer.utils.is_async_callable`) is awaited on TRL's own event loop
thread, concurrently with the other async reward functions: that is `make_async_trl_reward_func`.

Both are callable objects rather than closures: they pickle (TRL's experimental async GRPO trainer sends reward
functions to a spawned process) and open their client lazily, once per process (an asyncio client opens its
connections per event loop and closes them when the loop ends).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Mapping, Sequence

from .adapter_clients import TRANSPORTS, open_client
from .errors import DeadlineExceededError, InvalidInputError
from .lenient import ascore_isolating, expected_count, lenient_inputs, score_isolating, spread
from .retry import MIN_TIMEOUT_S
from .messages import clean_messages, message_text  # noqa: F401 (message_text: re-exported)
from .types import ScoreResult

ON_ERROR = ("raise", "none")
logger = logging.getLogger(__name__)


# ---- inputs -------------------------------------------------------------------------------------------
def trl_input(index: int, prompt: Any, completion: Any) -> dict[str, Any]:
    """One (prompt, completion) pair from TRL as a server input.

    Plain text: `{"prompt": prompt, "response": completion}` (the server renders it with the reward model's own
    template). Conversational: `{"messages": prompt + completion}`, tool calls and tool results included
    (clients/messages.py).
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    if is_message_list(prompt) and is_message_list(completion):
        try:
            return {"messages": clean_messages([*prompt, *completion])}
        except InvalidInputError as exc:  # says "messages.J: ..."
            raise InvalidInputError(f"inputs.{index}.{exc.message}", type="invalid_argument") from None
    raise InvalidInputError(
        f"inputs.{index}: prompt and completion must both be text or both be message lists, got "
        f"{type(prompt).__name__} and {type(completion).__name__}", type="invalid_argument")


def is_message_list(value: Any) -> bool:
    """A list (tuple, numpy array...) of messages, not text nor one message on its own."""
    return (value is not None and not isinstance(value, (str, bytes, Mapping))
            and hasattr(value, "__iter__") and hasattr(value, "__len__"))


def trl_inputs(prompts: Sequence[Any], completions: Sequence[Any]) -> list[dict[str, Any]]:
    if len(prompts) != len(completions):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(completions)} completions",
                                type="invalid_argument")
    return [trl_input(i, p, c) for i, (p, c) in enumerate(zip(prompts, completions))]


# ---- reward functions ---------------------------------------------------------------------------------
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

    def _value(self, result: ScoreResult) -> float:
        if self.normalize and result.normalized is not None:
            return float(result.normalized)
        return float(result.reward)

    def _rewards(self, results: list[ScoreResult], log_metric: Any) -> list[float]:
        if self.log_truncation and callable(log_metric) and results:
            log_metric(f"{self.__name__}/truncated", sum(r.truncated for r in results) / len(results))
        if callable(log_metric) and results and results[0].members:  # an ensemble: its members and std, logged
            for name in results[0].members:
                log_metric(f"{self.__name__}/{name}", sum(r.members[name] for r in results) / len(results))
            log_metric(f"{self.__name__}/std", sum(r.std or 0.0 for r in results) / len(results))
        return [self._value(r) for r in results]

    def _lenient_rewards(self, results: list[ScoreResult | None], errors: list[BaseException],
                         log_metric: Any) -> list[float | None]:
        """on_error="none": rewards with None where scoring failed; failures logged, never raised."""
        rewards = [None if r is None else self._value(r) for r in results]
        scored = [r for r in results if r is not None]
        try:
            if self.log_truncation and callable(log_metric) and scored:
                log_metric(f"{self.__name__}/truncated", sum(bool(r.truncated) for r in scored) / len(scored))
            if callable(log_metric) and results:
                log_metric(f"{self.__name__}/failed", (len(results) - len(scored)) / len(results))
        except Exception:  # noqa: BLE001 - a metric is not worth the rewards
            logger.warning("%s: logging a metric failed", self.__name__, exc_info=True)
        if errors:
            logger.warning("%s: %d of %d completions got no reward (None): %r", self.__name__,
                           len(results) - len(scored), len(results), errors[0])
        return rewards

    def _time_left(self, end: float | None) -> float | None:
        """The seconds left of a lenient call's `timeout`, which bounds all its requests together."""
        if end is None:
            return None
        left = end - time.monotonic()
        if left < MIN_TIMEOUT_S:
            raise DeadlineExceededError(f"timeout of {self.client_options['timeout']}s passed",
                                        type="deadline_exceeded")
        return left

    def _call_end(self) -> float | None:
        timeout = self.client_options.get("timeout")
        return None if timeout is None else time.monotonic() + timeout

    def _give_up(self, prompts: Any, completions: Any) -> list[None]:
        logger.warning("%s: no rewards for this batch (None)", self.__name__, exc_info=True)
        return [None] * expected_count(prompts, completions)


class TrlRewardFunc(_RewardFuncBase):
    """A blocking TRL reward function; see `make_trl_reward_func`."""

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None or self._owner != os.getpid():
                self._client = open_client(self.urls, transport=self.transport, **self.client_options)
                self._owner = os.getpid()
            return self._client

    def _score(self, inputs: list[dict], timeout: float | None = None) -> list[ScoreResult]:
        return self._get_client().score_full(inputs, timeout=timeout, **self._score_options())

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 **reward_kwargs: Any) -> list[float | None]:
        if self.on_error == "raise":
            inputs = trl_inputs(prompts, completions)
            return self._rewards(self._score(inputs), reward_kwargs.get("log_metric")) if inputs else []
        try:
            errors: list[BaseException] = []
            inputs = lenient_inputs(trl_input, prompts, completions, errors)
            positions = [i for i, item in enumerate(inputs) if item is not None]
            end = self._call_end()

            def score(part: list[dict]) -> list[ScoreResult]:
                return self._score(part, self._time_left(end))

            batch_size = self._get_client().max_batch_size if positions else None
            results = score_isolating(score, [inputs[i] for i in positions], errors, batch_size, positions)
            return self._lenient_rewards(spread(inputs, results), errors, reward_kwargs.get("log_metric"))
        except Exception:  # noqa: BLE001 - on_error="none" never raises
            return self._give_up(prompts, completions)

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._owner == os.getpid():
                self._client.close()
            self._client = None


class AsyncTrlRewardFunc(_RewardFuncBase):
    """A coroutine TRL reward function; see `make_async_trl_reward_func`. One client per event loop."""

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None or self._owner != os.getpid():
                # one client serves every event loop of this process: it opens its connections per loop and
                # closes them when the loop ends (a grpc.aio channel left open there breaks a later fork)
                self._client = open_client(self.urls, transport=self.transport, asynchronous=True,
                                           **self.client_options)
                self._owner = os.getpid()
            return self._client

    async def _score(self, inputs: list[dict], timeout: float | None = None) -> list[ScoreResult]:
        return await self._get_client().score_full(inputs, timeout=timeout, **self._score_options())

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                       **reward_kwargs: Any) -> list[float | None]:
        if self.on_error == "raise":
            inputs = trl_inputs(prompts, completions)
            return self._rewards(await self._score(inputs), reward_kwargs.get("log_metric")) if inputs else []
        try:
            errors: list[BaseException] = []
            inputs = lenient_inputs(trl_input, prompts, completions, errors)
            positions = [i for i, item in enumerate(inputs) if item is not None]
            end = self._call_end()

            async def score(part: list[dict]) -> list[ScoreResult]:
                return await self._score(part, self._time_left(end))

            client = self._get_client()
            results = await ascore_isolating(score, [inputs[i] for i in positions], errors, client.max_batch_size,
                                             client.max_concurrency, positions)
            return self._lenient_rewards(spread(inputs, results), errors, reward_kwargs.get("log_metric"))
        except Exception:  # noqa: BLE001 - on_error="none" never raises
            return self._give_up(prompts, completions)

    async def aclose(self) -> None:
        """Close the client (its connections of the running loop; those of ended loops closed with them)."""
        with self._lock:
            client, self._client = self._client, None
            mine = self._owner == os.getpid()
        if client is not None and mine:
            await client.close()


def make_trl_reward_func(url_or_urls: str | Sequence[str], *, transport: str = "http", api_key: str | None = None,
                         timeout: float | None = 60.0, **client_options: Any) -> TrlRewardFunc:
    """A reward function for TRL's `GRPOTrainer(reward_funcs=[...])` that scores with a rewardserve server.

    `url_or_urls`: an HTTP base URL (`http://host:8000`) or a gRPC target (`host:50051`), or a list of them
    (round-robin with failover). `transport`: "http" or "grpc". `timeout`: seconds per call, retries included.
    Also: `name` (metric name, default "rewardserve"), `normalize` (return the server's normalized rewards),
    `model`, `on_error` ("raise", default; or "none": never raises, a completion that cannot be scored gets None,
    which TRL leaves out; see clients/lenient.py), `log_truncation` (log the fraction of
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
