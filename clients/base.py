"""What the four clients share: options, the call shape (score / score_full / models / health / ready),
chunking, and the retry loop. Subclasses add one transport: `_prepare`, `_score_once`, `_models_once`,
`_probe` and `close` (and, blocking, `_reopen`: the connections of a forked child's own; clients/loops.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
from typing import Any, Iterable, Iterator, Sequence

from .errors import ClientClosedError, InvalidInputError
from .loops import ProcessCheck
from .retry import Deadline, EndpointPool, RetryPolicy, acall_with_retries, call_with_retries
from .types import InputLike, ModelInfo, ScoreResult, chunk_request_ids, split, to_input_dicts

PROBE_TIMEOUT_S = 5.0
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_CONCURRENCY = 4
"""4 requests of 256 inputs in flight per call: half the server's default queue (max_queue 2048), so one busy
client does not fill it alone (8 x 256 did: every other caller got 429 Overloaded)."""


class ClientBase:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int | None = None,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        cooldown_s: float = 5.0,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        Deadline(timeout)  # checks it
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_batch_size = max_batch_size
        self.policy = RetryPolicy(max_retries, backoff_base, backoff_cap, cooldown_s)
        self.pool = EndpointPool(endpoints, cooldown_s)
        self.rng = random.Random()
        self._closed = False
        self._process = ProcessCheck()

    def _check_usable(self) -> None:
        """Before every call: refuse a closed client; in a forked child, open this process's own connections."""
        if self._closed:
            raise ClientClosedError(f"{type(self).__name__} is closed: open a new client", type="client_closed")
        if self._process.changed():
            self.pool.after_fork()
            self.rng = random.Random()  # not the parent's jitter
            self._reopen()

    def _reopen(self) -> None:
        """In a forked child: replace the parent's connections (never close them: they are the parent's too)."""

    @property
    def endpoints(self) -> list[str]:
        return list(self.pool.endpoints)

    def _prepare(self, items: list[dict[str, Any]]) -> list[Any]:
        """Inputs (server JSON form) as this transport sends them; may raise InvalidInputError."""
        return items

    def _plan(self, inputs: Iterable[InputLike], timeout: float | None,
              request_id: str | None) -> tuple[Deadline, list[tuple[Sequence[Any], str]]]:
        if request_id is not None and not (request_id.isascii() and request_id.isprintable()):
            # it travels as an HTTP header (and gRPC metadata): said before anything is sent, on both transports
            raise InvalidInputError(f"request_id must be printable ASCII, got {request_id!r}", type="invalid_argument")
        deadline = self._deadline(timeout)
        wire = self._prepare(to_input_dicts(inputs))
        chunks = split(wire, self.max_batch_size)
        return deadline, list(zip(chunks, chunk_request_ids(request_id, len(chunks))))

    def _deadline(self, timeout: float | None) -> Deadline:
        self._check_usable()
        return Deadline(self.timeout if timeout is None else timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pool.endpoints!r})"


class SyncClient(ClientBase):
    """Blocking calls; a long input list is sent as chunks of `max_batch_size`, one after another."""

    def score(self, inputs: Iterable[InputLike], **options: Any) -> list[float]:
        """Raw rewards, in input order. Options as for `score_full`."""
        return [r.reward for r in self.score_full(inputs, **options)]

    def score_full(self, inputs: Iterable[InputLike], *, normalize: bool = False, model: str | None = None,
                   timeout: float | None = None, request_id: str | None = None) -> list[ScoreResult]:
        """One ScoreResult per input, in order. `timeout` (seconds) bounds the whole call, retries included."""
        deadline, plan = self._plan(inputs, timeout, request_id)
        results: list[ScoreResult] = []
        for chunk, rid in plan:
            send = functools.partial(self._score_once, chunk=chunk, request_id=rid, normalize=normalize,
                                     model=model or self.model)
            with inputs_counted_from(len(results)):
                results.extend(self._call(send, deadline))
        return results

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return self._call(self._models_once, self._deadline(timeout))

    def health(self) -> bool:
        """True when at least one endpoint is alive."""
        self._check_usable()
        return any(self._probe(e, ready=False) for e in self.pool.endpoints)

    def ready(self) -> bool:
        """True when at least one endpoint is ready to score (model loaded, not draining)."""
        self._check_usable()
        return any(self._probe(e, ready=True) for e in self.pool.endpoints)

    def _call(self, send: Any, deadline: Deadline) -> Any:
        return call_with_retries(self.pool, self.policy, deadline, self.rng, send)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(ClientBase):
    """Coroutine calls; the chunks of a long input list are sent concurrently (at most `max_concurrency`).
    Connections are per event loop (clients/loops.py): one client serves several `asyncio.run` calls in turn."""

    def __init__(self, endpoints: str | Sequence[str], *, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                 **options: Any):
        super().__init__(endpoints, **options)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency

    async def score(self, inputs: Iterable[InputLike], **options: Any) -> list[float]:
        return [r.reward for r in await self.score_full(inputs, **options)]

    async def score_full(self, inputs: Iterable[InputLike], *, normalize: bool = False, model: str | None = None,
                         timeout: float | None = None, request_id: str | None = None) -> list[ScoreResult]:
        deadline, plan = self._plan(inputs, timeout, request_id)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(chunk: Sequence[Any], rid: str, offset: int) -> list[ScoreResult]:
            send = functools.partial(self._score_once, chunk=chunk, request_id=rid, normalize=normalize,
                                     model=model or self.model)
            async with limit:
                with inputs_counted_from(offset):
                    return await self._call(send, deadline)

        offsets = [sum(len(chunk) for chunk, _ in plan[:k]) for k in range(len(plan))]
        parts = await gather_or_cancel([one(chunk, rid, offset) for (chunk, rid), offset in zip(plan, offsets)])
        return [result for part in parts for result in part]

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return await self._call(self._models_once, self._deadline(timeout))

    async def health(self) -> bool:
        self._check_usable()
        return any(await asyncio.gather(*(self._probe(e, ready=False) for e in self.pool.endpoints)))

    async def ready(self) -> bool:
        self._check_usable()
        return any(await asyncio.gather(*(self._probe(e, ready=True) for e in self.pool.endpoints)))

    async def _call(self, send: Any, deadline: Deadline) -> Any:
        return await acall_with_retries(self.pool, self.policy, deadline, self.rng, send)

    async def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


@contextlib.contextmanager
def inputs_counted_from(offset: int) -> Iterator[None]:
    """A server's refusal of one request of a split call names `inputs.K` within that request: said of the whole
    call, K counts from the request's first input."""
    try:
        yield
    except InvalidInputError as exc:
        if offset:
            exc.message = re.sub(r"\binputs\.(\d+)", lambda m: f"inputs.{int(m.group(1)) + offset}", exc.message)
            exc.args = (exc.message,)
        raise


async def gather_or_cancel(coros: list[Any]) -> list[Any]:
    """Results in order; the first failure (in input order) is raised and the others are cancelled."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    errors = [task.exception() for task in tasks if not task.cancelled()]  # every one read: no "never retrieved"
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise first
    return [task.result() for task in tasks]
