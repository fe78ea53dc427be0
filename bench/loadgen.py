"""Closed-loop load generator: N concurrent workers in one asyncio loop, each sending one pair per request and
waiting for its answer before sending the next. Pairs are taken from one shared cursor over the workload, so
every system gets the same pairs in the same order (the cursor restarts at 0 when the measured window opens).

Phases: warm-up (at least `warmup_s`, and until every worker has had an answer, bounded) -> measured window
-> drain (no new requests; those in flight are awaited, bounded, and not counted).

The window lasts `duration_s`, lengthened (up to `max_window_s`) when the answer rate seen in the warm-up
says it would hold fewer than `min_requests` answers: a batching server answers in bursts (a whole batch at
once), and a window of a few bursts miscounts by up to one burst. The length is fixed when the window opens,
never from the answers counted inside it (stopping on a count would end windows right after a burst and bias
the rate up). `max_requests` (optional) ends a window early after that many answers. Throughput counts successful answers completed inside the
window; latency percentiles are over those answers. Every failure (non-200, gRPC status != OK, timeout,
connection error) is counted as an error, in any phase.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence


class RequestFailed(Exception):
    """One request did not get a successful answer (message: status code and error type, never input text)."""


class Scorer(Protocol):
    async def score(self, index: int) -> float: ...


# ---- transports ----------------------------------------------------------------------------------------
def http_bodies(inputs: Sequence[dict[str, str]]) -> list[bytes]:
    """One pre-serialized `POST /v1/score` body per pair (one input per request)."""
    return [json.dumps({"inputs": [inp]}).encode() for inp in inputs]


def _http_error(status: int, body: bytes) -> RequestFailed:
    kind = ""
    try:  # rewardserve's error shape {"error": {"type": ...}}; other bodies may echo the input: not shown
        kind = str(json.loads(body)["error"]["type"])[:60]
    except Exception:
        pass
    return RequestFailed(f"HTTP {status} {kind}".strip())


class HttpScorer:
    """`POST {base}/v1/score` over keep-alive connections (aiohttp if installed, else httpx)."""

    def __init__(self, base_url: str, bodies: list[bytes], timeout_s: float):
        self.url = base_url.rstrip("/") + "/v1/score"
        self.base_url = base_url.rstrip("/")
        self.bodies = bodies
        self.timeout_s = timeout_s
        self._session: Any = None
        self._aiohttp = True

    async def __aenter__(self) -> "HttpScorer":
        try:
            import aiohttp
        except ImportError:
            import httpx

            self._aiohttp = False
            self._session = httpx.AsyncClient(
                timeout=self.timeout_s, limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)
            )
            return self
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._aiohttp:
            await self._session.close()
        else:
            await self._session.aclose()

    async def _request(self, method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"} if body is not None else None
        if self._aiohttp:
            async with self._session.request(method, url, data=body, headers=headers) as resp:
                return resp.status, await resp.read()
        resp = await self._session.request(method, url, content=body, headers=headers)
        return resp.status_code, resp.content

    async def score(self, index: int) -> float:
        status, body = await self._request("POST", self.url, self.bodies[index])
        if status != 200:
            raise _http_error(status, body)
        return float(json.loads(body)["scores"][0]["reward"])

    async def get_text(self, path: str) -> str:
        status, body = await self._request("GET", self.base_url + path)
        if status != 200:
            raise _http_error(status, body)
        return body.decode()


class GrpcScorer:
    """Unary `rewardserve.v1.RewardService/Score` over one grpc.aio channel (HTTP/2, multiplexed)."""

    def __init__(self, target: str, inputs: Sequence[dict[str, str]], timeout_s: float):
        from protos import reward_pb2

        self.target = target
        self.timeout_s = timeout_s
        self.requests = [
            reward_pb2.ScoreRequest(
                inputs=[reward_pb2.ScoreInput(pair=reward_pb2.PromptResponse(prompt=i["prompt"], response=i["response"]))]
            )
            for i in inputs
        ]
        self._channel: Any = None
        self._stub: Any = None

    async def __aenter__(self) -> "GrpcScorer":
        import grpc

        from protos import reward_pb2_grpc

        self._channel = grpc.aio.insecure_channel(self.target)
        await asyncio.wait_for(self._channel.channel_ready(), 30)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._channel.close()

    async def score(self, index: int) -> float:
        import grpc

        try:
            response = await self._stub.Score(self.requests[index], timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(f"gRPC {exc.code().name}: {(exc.details() or '')[:100]}") from None
        return float(response.scores[0].reward)


# ---- the closed loop -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    concurrency: int
    window_s: float = 0.0
    ok: int = 0
    tokens: int = 0  # tokens of the pairs answered in the window
    errors: int = 0  # in any phase
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    warmup_s: float = 0.0
    drain_s: float = 0.0
    abandoned: int = 0  # still in flight after the drain timeout (cancelled)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.ok / self.window_s if self.window_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        data = sorted(self.latencies_ms)
        if not data:
            return None
        return data[min(len(data) - 1, max(0, math.ceil(q / 100.0 * len(data)) - 1))]  # nearest rank

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None, nd: int = 2) -> float | None:
            return None if x is None else round(x, nd)

        mean = sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else None
        return {
            "concurrency": self.concurrency, "pairs_per_s": r(self.pairs_per_s, 3),
            "tokens_per_s": r(self.tokens / self.window_s if self.window_s else 0.0, 1),
            "p50_ms": r(self.percentile_ms(50)), "p99_ms": r(self.percentile_ms(99)), "mean_ms": r(mean),
            "ok": self.ok, "window_s": r(self.window_s, 3), "errors": self.errors,
            "error_samples": self.error_samples, "warmup_s": r(self.warmup_s, 2), "drain_s": r(self.drain_s, 2),
            "abandoned": self.abandoned, **self.extra,
        }


Hook = Callable[[], Awaitable[None]]


def window_length(warm_answers: int, warm_s: float, duration_s: float, min_requests: int, max_window_s: float) -> float:
    """duration_s, or longer (at most max_window_s) if the warm-up rate predicts fewer than min_requests answers."""
    if not min_requests or max_window_s <= duration_s:
        return duration_s
    if warm_answers <= 0 or warm_s <= 0:
        return max_window_s
    needed = 1.1 * min_requests / (warm_answers / warm_s)  # the warm-up rate is a low estimate (ramp-up)
    return min(max(duration_s, needed), max_window_s)


async def closed_loop(
    scorer: Scorer, tokens: Sequence[int], concurrency: int, *, warmup_s: float, duration_s: float,
    max_requests: int = 0, min_requests: int = 0, max_window_s: float = 0.0,
    warmup_max_s: float = 120.0, drain_timeout_s: float = 120.0,
    on_window_start: Hook | None = None, on_window_end: Hook | None = None,
) -> RunResult:
    """Run one measurement; `tokens[i]` is the length of pair i (for tokens/s)."""
    n = len(tokens)
    result = RunResult(concurrency)
    state = {"cursor": 0, "stop": False, "measuring": False, "t0": math.inf, "t1": math.inf, "answered": 0}
    window_full = asyncio.Event()

    def next_index() -> int:
        i = state["cursor"] % n
        state["cursor"] += 1
        return i

    async def worker() -> None:
        while not state["stop"]:
            i = next_index()
            start = time.perf_counter()
            try:
                await scorer.score(i)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(str(exc)[:160] or type(exc).__name__)
                await asyncio.sleep(0.01)  # a failing server must not turn the loop into a busy spin
                continue
            end = time.perf_counter()
            state["answered"] += 1
            if state["measuring"] and state["t0"] <= end <= state["t1"]:
                result.ok += 1
                result.tokens += tokens[i]
                result.latencies_ms.append((end - start) * 1000.0)
                if max_requests and result.ok >= max_requests:
                    window_full.set()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        begin = time.perf_counter()
        while True:  # warm-up: a minimum time, and until every worker had an answer (bounded)
            elapsed = time.perf_counter() - begin
            if elapsed >= warmup_s and (state["answered"] >= concurrency or elapsed >= warmup_s + warmup_max_s):
                break
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.02)
        result.warmup_s = time.perf_counter() - begin
        window_s = window_length(state["answered"], result.warmup_s, duration_s, min_requests, max_window_s)
        if on_window_start is not None:
            await on_window_start()
        state["cursor"] = 0
        state["t0"], state["measuring"] = time.perf_counter(), True
        try:
            await asyncio.wait_for(window_full.wait(), window_s)
        except asyncio.TimeoutError:
            pass
        state["t1"] = time.perf_counter()
        result.window_s = state["t1"] - state["t0"]
        if on_window_end is not None:
            await on_window_end()
        state["stop"] = True
        drain_start = time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        result.drain_s = time.perf_counter() - drain_start
        result.abandoned = len(pending)
    finally:
        state["stop"] = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result
