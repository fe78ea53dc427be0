"""Two replicas (separate `rewardserve serve` processes), every client kind holding both, one replica killed
with SIGKILL in the middle of the run: no call fails and every reward is the right one.

SIGKILL is the crash case (OOM killer, node loss): no drain, no 503, sockets reset under requests in flight.
Those requests are retried on the other replica (scoring is idempotent); new ones find the port closed and
fail over at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from clients import (
    AsyncGrpcRewardClient,
    AsyncRewardClient,
    GrpcRewardClient,
    RewardClient,
)
from tests.helpers import free_port, metric_value, wait_ready

pytestmark = pytest.mark.slow  # two server processes
KINDS = {"http": RewardClient, "grpc": GrpcRewardClient, "async-http": AsyncRewardClient,
         "async-grpc": AsyncGrpcRewardClient}
# long enough that a kill lands on requests in flight, varied so that a mix-up would show
INPUTS = [{"prompt": f"question {i} " + "about something " * 20, "response": f"answer {i} " * 30} for i in range(6)]
OPTIONS = {"cooldown_s": 0.2, "timeout": 30, "max_retries": 5, "backoff_base": 0.01, "backoff_cap": 0.05}


class Replica:
    def __init__(self, model_dir):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewardserve.cli", "serve", "--model", str(model_dir), "--model-name", "tiny-bert",
             "--port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--threads", "1",
             "--log-level", "warning"],
            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def endpoint(self, kind: str) -> str:
        return f"127.0.0.1:{self.grpc_port}" if kind.endswith("grpc") else self.url

    def requests_answered(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return metric_value(text, "rewardserve_requests_total", code="200") + \
            metric_value(text, "rewardserve_requests_total", code="OK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def replicas(tiny_bert_dir):
    started = [Replica(tiny_bert_dir), Replica(tiny_bert_dir)]
    try:
        for replica in started:
            wait_ready(replica.url, replica.proc)
        yield started
    finally:
        for replica in started:
            replica.stop()


def hammer(kind, endpoints, expected, stop, calls, failures) -> None:
    def check(rewards):
        if rewards != pytest.approx(expected, abs=1e-5):  # the batch-invariance contract
            failures.append((kind, "wrong rewards", rewards))
        calls[kind] += 1

    if kind.startswith("async"):
        async def run():
            async with KINDS[kind](endpoints, **OPTIONS) as client:
                while not stop.is_set():
                    try:
                        check(await client.score(INPUTS))
                    except Exception as exc:  # noqa: BLE001 - every failure is the test's business
                        failures.append((kind, repr(exc)))

        asyncio.run(run())
        return
    with KINDS[kind](endpoints, **OPTIONS) as client:
        while not stop.is_set():
            try:
                check(client.score(INPUTS))
            except Exception as exc:  # noqa: BLE001
                failures.append((kind, repr(exc)))


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_sigkill_of_one_replica_loses_no_call(replicas):
    doomed, survivor = replicas
    expected = [s["reward"] for s in httpx.post(survivor.url + "/v1/score", json={"inputs": INPUTS},
                                                timeout=60).json()["scores"]]
    stop, failures = threading.Event(), []
    calls = dict.fromkeys(KINDS, 0)
    threads = [threading.Thread(target=hammer, args=(kind, [doomed.endpoint(kind), survivor.endpoint(kind)],
                                                     expected, stop, calls, failures)) for kind in KINDS]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: min(calls.values()) >= 10)
        assert doomed.requests_answered() >= 10  # both replicas were serving: round-robin
        doomed.proc.kill()  # SIGKILL: no drain, connections reset
        killed_at = dict(calls)
        assert doomed.proc.wait(timeout=30) == -9
        wait_for(lambda: all(calls[k] >= killed_at[k] + 30 for k in KINDS))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    assert survivor.requests_answered() >= sum(calls.values()) // 2
