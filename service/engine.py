"""RewardEngine: the one way in for every transport and route. Transport-free.

HTTP, gRPC, the compat routes and Best-of-N all call `score` (Best-of-N first takes its queue room with
`admit`, before it generates). Each request goes through the same steps, cheapest first:

1. admit: draining? known model? a sane input count? room in the queue? (OVERLOADED before any CPU is spent);
2. encode: render and tokenize each input (an `Encoder`: rewardserve's rendering by default, vLLM's tokenization
   for the vLLM-compatible routes), on the event loop when the request is small, on a tokenizer thread when it
   is large, so one big request never stalls the loop; an input the model cannot read is INVALID_ARGUMENT naming
   `inputs.<i>`;
3. score: the batcher's worker computes it with whatever else is queued;
4. answer: a non-finite reward fails only its own request (BACKEND).

Errors are `RewardServeError`s, translated at the edge (service/error_map.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rewardmodel.normalization import RewardStats, load_stats
from rewardmodel.rendering import Encoded, RenderError, encode_input
from service import metrics
from service.batcher import DynamicBatcher, Reservation
from service.config import ServeConfig
from service.errors import ErrorKind, RewardServeError, invalid
from service.schemas import ScoreResult

log = logging.getLogger("rewardserve.engine")

# A request whose texts hold more characters than this is tokenized on a tokenizer thread, not on the event loop
# (tokenizing costs ~1 ms per 4,000 characters; a loop stall of that order is invisible to other requests).
TOKENIZE_INLINE_MAX_CHARS = 4096
DEADLINE_SLACK_S = 0.05

Encoder = Callable[[Any], Encoded]
"""Turns one input into token ids (may raise RenderError or RewardServeError: the client's mistake)."""


@dataclass
class Evaluated:
    encoded: list[Any]  # per input: its Encoded (or StepEncoded)
    values: list[Any]  # per input: float32 array (reads, outputs)
    queue_s: float
    compute_s: float


@dataclass
class ScoreOutcome:
    model: str
    results: list[ScoreResult]
    queue_s: float
    compute_s: float


def input_chars(inp: Any) -> int:
    """A cheap size of one input (characters of its texts, or its token count): decides where it is tokenized."""
    if isinstance(inp, str):
        return len(inp)
    if isinstance(inp, (list, tuple)):
        return sum(1 if isinstance(v, int) else input_chars(v) for v in inp)
    if isinstance(inp, dict):
        return sum(input_chars(v) for v in inp.values())
    fields = getattr(inp, "__dict__", None)
    return input_chars(fields) if fields is not None else 0


def model_aliases(config: ServeConfig, name: str, source: Any) -> set[str]:
    """The names a model answers to: its served name, the spec and path it was started with (vLLM names a model
    by its path, and verl sends that path back), and the configured aliases (`--served-model-name`)."""
    names = {name, config.model, *config.served_model_name} | source_paths(source)
    return {n for n in names if n}


def source_paths(source: Any) -> set[str]:
    """The folder a model was loaded from, as given and resolved (a client may send either as its name)."""
    path = getattr(source, "home", None) or getattr(source, "path", None)
    return set() if path is None else {str(path), str(Path(path).resolve())}


class RewardEngine:
    def __init__(self, config: ServeConfig, backend: Any):
        self.config = config
        self.backend = backend
        self.name = backend.name
        self.tokenizer = backend.tokenizer
        self.max_length = backend.max_length
        source = getattr(backend, "source", None)
        self.aliases = model_aliases(config, self.name, source)
        self.stats: RewardStats | None = load_stats(getattr(source, "home", source.path)) if source is not None else None
        self.ready = False
        self.accepting = True
        self.observer = metrics.ModelObserver(self.name)
        self.batcher = DynamicBatcher(
            backend.score_batch,
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_padding_ratio=config.max_padding_ratio,
            max_queue=config.max_queue,
            packed=bool(getattr(backend, "packed", False)),
            group_min_prefix=config.group_min_prefix if getattr(backend, "prefix_groups", False) else 0,
            observer=self.observer,
        )
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardserve-tokenize")

    @classmethod
    def from_config(cls, config: ServeConfig) -> "RewardEngine":
        from service.backends.registry import create_backend

        return cls(config, create_backend(config))

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.warmup:  # before the worker starts: still the only thread touching the model
            await asyncio.to_thread(self.backend.warmup)
        self.batcher.start()
        if self.config.warmup:  # and once through the whole path (not `score`: no traffic metrics of its own)
            warm = [{"prompt": "Hello", "response": "Hi! How can I help?"}] * 2
            await self.evaluate(warm, reservation=self.admit(len(warm)))
        self.ready = True
        metrics.READY.labels(self.name).set(1)
        info = self.describe()
        if info:
            metrics.MODEL_INFO.labels(self.name, info.get("dtype", ""), info.get("forward", ""),
                                      str(bool(info.get("compiled"))).lower(),
                                      str(info.get("batch_invariant")).lower()).set(1)
        log.info("model %s ready (max_length=%d, %s)", self.name, self.max_length,
                 ", ".join(f"{k}={v}" for k, v in info.items()))

    def describe(self) -> dict[str, Any]:
        """How the backend computes (dtype, forward, invariance self-check, machine ISA), when it says."""
        describe = getattr(self.backend, "describe", None)
        return describe() if describe is not None else {}

    def mark_draining(self) -> None:
        """Readiness false and new work refused (UNAVAILABLE); what was admitted still completes."""
        self.ready = False
        self.accepting = False
        metrics.READY.labels(self.name).set(0)

    async def stop(self) -> None:
        self.mark_draining()
        await asyncio.to_thread(self.batcher.stop)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    # ---- admission ---------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model not in self.aliases:
            raise RewardServeError(ErrorKind.NOT_FOUND, f"unknown model {model!r}; this server serves {self.name!r}")

    def admit(self, count: int, *, model: str | None = None, normalize: bool = False,
              field: str = "inputs") -> Reservation:
        """The cheap checks, then queue room for `count` inputs (OVERLOADED at once when full). Release the
        reservation (or pass it to `score`) when done."""
        if not self.accepting:
            raise RewardServeError(ErrorKind.UNAVAILABLE, "the server is draining: send to another replica")
        self.check_model(model)
        if count < 1:
            raise invalid(f"{field} is empty: send at least one input")
        limit = self.config.max_inputs_per_request
        if count > limit:
            raise invalid(f"{field}: {count} entries, more than max_inputs_per_request={limit}")
        if normalize and self.stats is None:
            raise invalid(f"model {self.name!r} has no reward statistics (reward_stats.json): cannot normalize")
        return self.batcher.reserve(count)

    # ---- encoding ----------------------------------------------------------------------------------------
    def default_encoder(self, inp: Any) -> Encoded:
        return encode_input(self.tokenizer, inp, self.max_length)

    def _encode_all(self, inputs: Sequence[Any], encoder: Encoder, field: str,
                    stop: threading.Event | None = None) -> list[Encoded]:
        encoded = []
        for i, inp in enumerate(inputs):
            if stop is not None and stop.is_set():  # its caller went away: the tokenizer thread is for others
                raise RewardServeError(ErrorKind.CANCELLED, "the caller went away while its inputs were tokenized")
            try:
                encoded.append(encoder(inp))
            except RenderError as exc:
                raise invalid(f"{field}.{i}: {exc}") from None
            except RewardServeError as exc:
                if exc.kind is ErrorKind.INVALID_ARGUMENT and not exc.message.startswith(field):
                    raise invalid(f"{field}.{i}: {exc.message}") from None
                raise
        return encoded

    async def encode(self, inputs: Sequence[Any], encoder: Encoder | None = None,
                     field: str = "inputs") -> list[Encoded]:
        encoder = encoder or self.default_encoder
        if sum(input_chars(inp) for inp in inputs) <= TOKENIZE_INLINE_MAX_CHARS:
            return self._encode_all(inputs, encoder, field)
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        try:
            return await loop.run_in_executor(self._tokenize_pool, self._encode_all, inputs, encoder, field, stop)
        except asyncio.CancelledError:
            stop.set()  # the thread stops at the next input (one text already begun is finished)
            raise

    # ---- scoring -----------------------------------------------------------------------------------------
    async def score(
        self,
        inputs: Sequence[Any],
        *,
        model: str | None = None,
        deadline: float | None = None,
        normalize: bool = False,
        encoder: Encoder | None = None,
        reservation: Reservation | None = None,
        field: str = "inputs",
    ) -> ScoreOutcome:
        """Score inputs (`service.schemas` input models or plain dicts; with `encoder`, whatever it takes), in
        order. `reservation`: queue room taken earlier with `admit` (a Best-of-N request, admitted before a drain
        began, is answered, not refused)."""
        if reservation is None:
            reservation = self.admit(len(inputs), model=model, normalize=normalize, field=field)
        elif normalize and self.stats is None:
            raise invalid(f"model {self.name!r} has no reward statistics (reward_stats.json): cannot normalize")
        evaluated = await self.evaluate(inputs, deadline=deadline, encoder=encoder, reservation=reservation,
                                        field=field)
        rewards = [float(v[-1, 0]) for v in evaluated.values]
        encoded = evaluated.encoded
        queue_s, compute_s = evaluated.queue_s, evaluated.compute_s
        results = [
            ScoreResult(
                reward=r,
                truncated=e.truncated,
                tokens=e.tokens,
                normalized=self.stats.normalize(r) if normalize and self.stats else None,
            )
            for r, e in zip(rewards, encoded)
        ]
        metrics.observe_results(self.name, rewards, sum(e.truncated for e in encoded))
        return ScoreOutcome(self.name, results, queue_s, compute_s)

    async def evaluate(self, inputs: Sequence[Any], *, deadline: float | None = None, encoder: Encoder | None = None,
                       reservation: Reservation, field: str = "inputs") -> "Evaluated":
        """Encode admitted inputs and compute them: per input its encoding and its head outputs at its reads, an
        array (reads, outputs). Non-finite outputs fail the request (BACKEND)."""
        with reservation:
            encoded = await self.encode(inputs, encoder, field)
            reads = [getattr(e, "step_ends", None) for e in encoded]
            reads = None if all(r is None for r in reads) else [tuple(r) if r is not None else None for r in reads]
            values, queue_s, compute_s = await self._run([e.input_ids for e in encoded], deadline, reservation, reads)
        broken = [i for i, v in enumerate(values) if not np.isfinite(v).all()]
        if broken:  # each computed alone by now (service/batcher.py): these inputs themselves give NaN/inf
            named = ", ".join(f"{field}.{i}" for i in broken[:8]) + (f" and {len(broken) - 8} more" if len(broken) > 8
                                                                        else "")
            rest = "; the request's other inputs scored fine" if len(broken) < len(values) else ""
            raise RewardServeError(ErrorKind.BACKEND, f"{named}: the model produced a non-finite reward (NaN or inf), "
                                   f"computed alone{rest}")
        return Evaluated(encoded, values, queue_s, compute_s)

    async def _run(self, batch: Sequence[Sequence[int]], deadline: float | None, reservation: Reservation,
                   reads: Sequence[tuple[int, ...] | None] | None = None) -> tuple[list[Any], float, float]:
        """Backend values for token-id lists, plus the longest queue wait among them and the compute time of the
        forward passes that computed them (each pass once: a request over several passes sums them)."""
        if deadline is not None and deadline <= time.monotonic():
            raise RewardServeError(ErrorKind.DEADLINE, "deadline passed before the request was queued")
        items = self.batcher.submit(batch, deadline, reservation, reads)
        waiter = asyncio.gather(*(item.future for item in items))
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            rewards = await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise RewardServeError(ErrorKind.DEADLINE, "deadline exceeded before scoring finished") from None
        finally:
            for item in items:  # caller went away or failed: let the worker skip what it has taken already
                if not item.future.done():
                    item.future.cancel()
            # and what is still queued leaves the queue now (none once answered); a caller leaving at about its
            # deadline (gRPC ends the call at it, a hair before the engine's own timer) is counted as missing it
            expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
            self.batcher.withdraw(items, "deadline" if expired else "cancelled")
        return (
            list(rewards),
            max(item.queue_s for item in items),
            sum({item.computed_at: item.compute_s for item in items}.values()),
        )
