"""SIGTERM in the middle of a burst: every accepted request gets its reward, later ones a clean 503 or a
refused connection, and the process exits 0."""

import asyncio
import os
import signal
import subprocess
import sys

import httpx

from tests.helpers import free_port, wait_ready


async def test_sigterm_mid_burst_answers_everything_accepted(tiny_bert_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewardserve.cli", "serve", "--model", str(tiny_bert_dir), "--port", str(port),
         "--grpc-port", "-1", "--log-level", "warning", "--max-batch-size", "4", "--threads", "1"],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        long_inputs = [{"prompt": "word " * 200, "response": f"answer {i} " * 50} for i in range(8)]

        async def one(client, i):
            try:
                return await client.post("/v1/score", json={"inputs": long_inputs}, timeout=60)
            except httpx.TransportError as exc:  # refused after the listener closed: never accepted
                return exc

        async with httpx.AsyncClient(base_url=url) as client:
            tasks = [asyncio.ensure_future(one(client, i)) for i in range(40)]
            await asyncio.sleep(0.3)  # the burst is in flight and queued
            proc.send_signal(signal.SIGTERM)
            later = [asyncio.ensure_future(one(client, 100 + i)) for i in range(10)]
            results = await asyncio.gather(*tasks, *later)
        assert proc.wait(timeout=60) == 0
        answered = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
        refused = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 503]
        dropped = [r for r in results if isinstance(r, httpx.TransportError)]
        others = [r for r in results if isinstance(r, httpx.Response) and r.status_code not in (200, 503)]
        assert not others, [(r.status_code, r.text) for r in others]
        assert len(answered) >= 10  # the burst had started before SIGTERM
        for r in answered:
            assert len(r.json()["scores"]) == 8
        for r in refused:
            assert r.json()["error"]["type"] == "unavailable"
        # the burst sent before SIGTERM is answered (a reward, or a clean 503 if its handler ran after it):
        # no request of the burst loses its connection
        burst = results[:40]
        assert all(isinstance(r, httpx.Response) for r in burst), [r for r in burst if not isinstance(r, httpx.Response)]
        # only requests sent after SIGTERM may find the listener closed (connection refused)
        assert all(isinstance(e, httpx.ConnectError) for e in dropped), dropped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
