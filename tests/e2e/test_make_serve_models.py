"""What `make serve` serves (the Makefile's SERVE_MODELS): the harmless default first, the helpfulness heads (one per
layer read) and the routed ensemble beside it over one backbone, each answering by name; the default's rewards have the same bits as
`rewardserve serve` alone gives them (a head's column is computed alone, whatever other heads share the pass)."""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rewardmodel.modeling import OVERLAY_META, default_model_dir
from tests.helpers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
INPUTS = [
    {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes, then cool it in cold water."},
    {"prompt": "How do I boil an egg?", "response": "No."},
]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (default_model_dir().parent / "ensemble" / OVERLAY_META).exists(), reason="no shipped ensemble")]


def _serve(port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rewardserve.cli", "serve", *flags, "--port", str(port),
                             "--grpc-port", "-1", "--log-level", "warning"],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rewards(url: str, model: str | None) -> list[dict]:
    body = {"inputs": INPUTS, **({"model": model} if model else {})}
    reply = httpx.post(url + "/v1/score", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["scores"]


def test_make_serve_serves_default_helpful_and_the_ensemble():
    flags = shlex.split(re.search(r"^SERVE_MODELS = (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1))
    port, alone_port = free_port(), free_port()
    procs = [_serve(port, *flags), _serve(alone_port)]
    try:
        url, alone_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{alone_port}"
        wait_ready(url, procs[0], timeout=300)
        wait_ready(alone_url, procs[1], timeout=300)
        listed = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert list(listed)[0] == "rewardserve-default" and {"helpful", "ensemble"} <= set(listed)
        assert len({m.get("backbone") for m in listed.values() if m.get("backbone")}) == 1  # one backbone
        default = _rewards(url, None)
        assert [s["reward"] for s in _rewards(url, "default")] == [s["reward"] for s in default]  # path alias
        assert [s["reward"] for s in default] == [s["reward"] for s in _rewards(alone_url, None)]  # same bits
        ensemble = _rewards(url, "ensemble")
        gate = listed["ensemble"]["gate"]  # routes safety-relevant prompts to the harmless head
        assert gate["members"] == {"ensemble/harmless": 1.0} and gate["reads"] == "prompt"
        key = gate["model"] + "@prompt"
        for score in ensemble:
            members = score["members"]
            heads = {m for m in listed if m.startswith("ensemble/")}  # every head but the gate is a member
            assert set(members) == (heads - {gate["model"]}) | {key} and "ensemble/L30" in members
            assert members[key] <= gate["threshold"]  # a cooking question is not routed to the harmless head
            assert score["std"] > 0  # the helpfulness heads' spread
        assert ensemble[0]["members"][key] == ensemble[1]["members"][key]  # one prompt, one route
        assert ensemble[0]["members"]["ensemble/harmless"] == default[0]["reward"]  # the same head, the same bits
        helpful = _rewards(url, "helpful")  # the normalized mean of heads over six layers, with its members
        assert ensemble[1]["members"]["ensemble/L30"] == helpful[1]["members"]["helpful/L30"]
        assert ensemble[1]["members"]["ensemble/L8"] == helpful[1]["members"]["helpful/L8"]
        texts = [f"{i['prompt']} {i['response']}" for i in INPUTS]  # vLLM's /classify (verl's route) takes helpful
        classify = httpx.post(url + "/classify", json={"model": "helpful", "input": texts, "use_activation": False},
                              timeout=120)
        assert classify.status_code == 200, classify.text
        raw = httpx.post(url + "/v1/score", json={"model": "helpful", "inputs": [{"raw": t} for t in texts]},
                         timeout=120).json()["scores"]
        assert [d["probs"][0] for d in classify.json()["data"]] == [s["reward"] for s in raw]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
