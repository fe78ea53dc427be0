"""Shared test helpers: tiny reward models built from configs, and a live server on loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.config import ServeConfig


def make_tiny_bert_rm(out: Path, seed: int = 0) -> Path:
    """A 2-layer BERT reward model with the MiniLM tokenizer (no chat template: plain format)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rewardmodel.modeling import minilm_path

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1, pad_token_id=0,
        initializer_range=0.4,  # spread the untrained rewards so tests can tell inputs apart
    )
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(out)
    return out


def make_tiny_llama_rm(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama reward model with the SmolLM2 tokenizer and its chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024, num_labels=1,
        initializer_range=0.4,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_llama_lm(out: Path, tokenizer_dir: Path, seed: int = 0, hidden_size: int = 32, heads: int = 4) -> Path:
    """A 2-layer Llama causal LM (tied embeddings) with the SmolLM2 tokenizer: a policy for DPO / PPO tests.
    vLLM's CPU attention needs head_dim 32: use hidden_size=64, heads=2 for a model vLLM runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1), intermediate_size=2 * hidden_size, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_head_overlay(out: Path, base: Path, rows: Any, heads: list[str] | None = None,
                      head_layers: list[int] | None = None, num_layers: int | None = None) -> Path:
    """A score-head overlay over the checkpoint `base` (absolute path): rows (K, H) as score.weight, optional head
    names, per-head read layers (`head_layers`) or a layer cut (`num_hidden_layers`)."""
    import json

    from safetensors.torch import save_file

    from rewardmodel.modeling import OVERLAY_META, OVERLAY_TENSORS, sha256_file

    out.mkdir(parents=True)
    meta: dict[str, Any] = {"base": str(Path(base).resolve()), "base_sha256": sha256_file(Path(base) / "model.safetensors"),
                            "max_length": 256, "num_hidden_layers": num_layers}
    if heads:
        meta["heads"] = heads
    if head_layers is not None:
        meta["head_layers"] = head_layers
    (out / OVERLAY_META).write_text(json.dumps(meta))
    save_file({"score.weight": rows.contiguous()}, str(out / OVERLAY_TENSORS))
    return out


def save_smollm2_tokenizer(out: Path) -> Path:
    from rewardmodel.modeling import load_tokenizer, resolve_model

    load_tokenizer(resolve_model("smollm2")).save_pretrained(out)
    return out


def test_config(model_dir: Path | str, **overrides: Any) -> ServeConfig:
    """A server config for tests: free ports, quiet logs, and fp32 compute (`dtype: auto` picks bf16 on some of the
    project's machines and fp32 on others; tests that compare with fp32 references must not depend on which)."""
    base = dict(model=str(model_dir), port=0, grpc_port=0, warmup=True, log_level="warning", dtype="float32")
    base.update(overrides)
    return ServeConfig(**base)


test_config.__test__ = False  # a helper, not a test (modules import it by name)


class LiveServer:
    """A real Runtime (uvicorn + grpc.aio) on 127.0.0.1 free ports, in a background thread with its own loop."""

    def __init__(self, config: ServeConfig):
        from service.runtime import Runtime

        self.config = config
        self.runtime = Runtime(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.runtime.start(), self.loop).result(timeout=300)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, grace_s: float = 5.0) -> None:
        if self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.runtime.drain_and_stop(grace_s), self.loop)
            fut.result(timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. to poke at the engine) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    @property
    def engine(self) -> Any:
        return self.runtime.engine

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.runtime.grpc_port}"


class inject_latency:
    """Fault injection: every forward pass of a live server's engine takes `delay` seconds longer."""

    def __init__(self, server: LiveServer, delay: float):
        self.batcher = server.engine.batcher
        self.delay = delay
        self.original = self.batcher._compute

    def __enter__(self) -> "inject_latency":
        import time

        def slow(batch: Any) -> Any:
            time.sleep(self.delay)
            return self.original(batch)

        self.batcher._compute = slow
        return self

    def __exit__(self, *exc: Any) -> None:
        self.batcher._compute = self.original


class hold_forward:
    """Fault injection: every forward pass of a live server's engine blocks until `release()` (or `hold_s`).

    For "answered without waiting for the model" checks that do not depend on the machine's speed: the answer
    must come back while `released` is still False; were it to wait for the forward pass, it would only come
    after the safety release at `hold_s`, and `released` would say so."""

    def __init__(self, server: LiveServer, hold_s: float = 30.0):
        self.batcher = server.engine.batcher
        self.hold_s = hold_s
        self.original = self.batcher._compute
        self.gate = threading.Event()
        self.entered = threading.Event()  # a forward pass has started and is being held
        self.released = False

    def release(self) -> None:
        self.released = True
        self.gate.set()

    def __enter__(self) -> "hold_forward":
        def held(batch: Any) -> Any:
            self.entered.set()
            if not self.gate.wait(self.hold_s):
                self.released = True  # the safety release: whoever waited for this pass shows it
            return self.original(batch)

        self.batcher._compute = held
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
        self.batcher._compute = self.original


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of a metric in Prometheus text whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def run_with_imports_blocked(blocked: set[str], body: str, *args: str, cwd: Path, timeout: float = 120) -> Any:
    """Run `body` in a fresh Python where importing any of `blocked` (top-level names) raises ImportError.

    `BLOCKED` is defined for the body, e.g. to check that none of them leaked into sys.modules."""
    import subprocess
    import sys

    prelude = (
        "import importlib.abc, sys\n"
        f"BLOCKED = {sorted(blocked)!r}\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Blocker())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + body, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def dies_at_call(real_step: Any, n: int, *, training_only: bool = True) -> Any:
    """`real_step(model, batch, **kw)` wrapped to raise KeyboardInterrupt (a simulated kill) at its n-th call,
    counting only calls made with the model in training mode unless `training_only` is False."""
    calls = 0

    def step(model: Any, batch: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if model.training or not training_only:
            calls += 1
            if calls == n:
                raise KeyboardInterrupt("simulated kill")
        return real_step(model, batch, **kwargs)

    return step


@contextmanager
def gated_worker(server: Any) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold a live server's batcher worker inside its next forward pass (`entered` set) until `gate` opens, so
    that what is sent meanwhile queues up."""
    batcher = server.engine.batcher
    entered, gate, original = threading.Event(), threading.Event(), batcher._compute

    def compute(batch: Any) -> Any:
        entered.set()
        gate.wait(30)
        return original(batch)

    batcher._compute = compute
    try:
        yield entered, gate
    finally:
        gate.set()
        batcher._compute = original


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it once this returns)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: Any, timeout: float = 120) -> None:
    """Poll GET /ready of a server subprocess until 200; fail early if the process exits."""
    import time

    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")
