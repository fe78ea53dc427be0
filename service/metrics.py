"""Every Prometheus collector of rewardserve, defined once. Names are prefixed `rewardserve_`."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
REWARD_BUCKETS = (-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10)

REQUESTS = Counter(
    "rewardserve_requests", "Requests answered, by transport, route and status code.",
    ["transport", "route", "code"],
)
REQUEST_LATENCY = Histogram(
    "rewardserve_request_latency_seconds", "Time from request arrival to answer.",
    ["transport", "route"], buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("rewardserve_in_flight_requests", "Requests being handled now.", ["transport"])
QUEUE_WAIT = Histogram(
    "rewardserve_queue_wait_seconds", "Time an input waited in the batcher queue before its forward pass.",
    ["model"], buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("rewardserve_queue_depth", "Inputs queued or being computed.", ["model"])
BATCH_SIZE = Histogram(
    "rewardserve_batch_size", "Inputs per forward pass.", ["model"], buckets=SIZE_BUCKETS,
)
BATCH_TOKENS = Histogram(
    "rewardserve_batch_tokens", "Tokens computed per forward pass (padded: longest x inputs; packed: real).",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
PADDING_RATIO = Histogram(
    "rewardserve_padding_ratio", "Share of a forward pass's tokens that are padding.", ["model"],
    buckets=RATIO_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "rewardserve_batch_compute_seconds", "Time of one forward pass.", ["model"], buckets=LATENCY_BUCKETS,
)
INPUTS = Counter("rewardserve_inputs", "Inputs scored.", ["model"])
TRUNCATED = Counter("rewardserve_truncated_inputs", "Inputs truncated from the left to fit.", ["model"])
DROPPED = Counter(
    "rewardserve_dropped_inputs", "Inputs dropped before compute (caller gone or deadline passed).",
    ["model", "reason"],
)
REWARDS = Histogram("rewardserve_reward", "Raw rewards served.", ["model"], buckets=REWARD_BUCKETS)
GROUPED_INPUTS = Counter(
    "rewardserve_grouped_inputs", "Inputs scored in a shared-prefix group (their common prefix computed once).",
    ["model"],
)
PREFIX_TOKENS_SAVED = Counter(
    "rewardserve_prefix_tokens_saved", "Prefix tokens not computed thanks to shared-prefix groups.", ["model"],
)
READY = Gauge("rewardserve_ready", "1 when the model is loaded and warmed, 0 otherwise.", ["model"])
MODEL_INFO = Gauge(
    "rewardserve_model_info", "1 for each served model: how it computes (dtype, forward, whether its element-wise "
    "work is compiled, whether the start-up check found rewards bit-identical whatever shares their batch).",
    ["model", "dtype", "forward", "compiled", "batch_invariant"],
)


class ModelObserver:
    """The batcher's observer, bound to one model's label."""

    def __init__(self, model: str):
        self.model = model
        self._depth = QUEUE_DEPTH.labels(model)

    def on_batch(self, size: int, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        BATCH_SIZE.labels(self.model).observe(size)
        BATCH_TOKENS.labels(self.model).observe(padded_tokens)
        PADDING_RATIO.labels(self.model).observe(1.0 - real_tokens / padded_tokens if padded_tokens else 0.0)
        BATCH_SECONDS.labels(self.model).observe(seconds)

    def on_queue_wait(self, seconds: float) -> None:
        QUEUE_WAIT.labels(self.model).observe(seconds)

    def on_dropped(self, reason: str) -> None:
        DROPPED.labels(self.model, reason).inc()

    def on_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def on_groups(self, inputs: int, saved_tokens: int) -> None:
        GROUPED_INPUTS.labels(self.model).inc(inputs)
        PREFIX_TOKENS_SAVED.labels(self.model).inc(saved_tokens)


def observe_results(model: str, rewards: list[float], truncated: int) -> None:
    INPUTS.labels(model).inc(len(rewards))
    if truncated:
        TRUNCATED.labels(model).inc(truncated)
    hist = REWARDS.labels(model)
    for r in rewards:
        hist.observe(r)


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
