"""transformers `generate` as the fallback generator. One worker thread owns the policy; the event loop
only waits. A request whose deadline passes (or whose caller goes away) stops its generation at the next
token: a stopping criterion watches a flag."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.errors import RewardServeError
from service.generation.base import (
    Generation, Messages, Sampling, check_prompt_fits, deadline_error, device_and_dtype, generator_error,
    remaining_s, render_prompt_ids,
)
from service.generation.policy import policy_dir

log = logging.getLogger("rewardserve.generation")


class _Stop:
    """A stopping criterion: stop every sequence once `flag` is set or the deadline has passed."""

    def __init__(self, flag: threading.Event, deadline: float | None):
        self.flag, self.deadline = flag, deadline

    def expired(self) -> bool:
        return self.flag.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.expired(), dtype=torch.bool, device=input_ids.device)


class HFGenerator:
    def __init__(self, target: str, config: Any):
        self.target = target
        self.name = f"hf:{target}"
        self.max_model_len = int(getattr(config, "generator_max_model_len", 2048))
        self.config = config
        self.device = "cpu"
        self.model: Any = None
        self.tokenizer: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardserve-hf-generate")
        self._lock = threading.Lock()  # one generate at a time: it seeds the global RNG

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = policy_dir(self.target)
        self.device, dtype = device_and_dtype(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            self.max_model_len = min(self.max_model_len, positions)
        log.info("hf generator: %s loaded (max_model_len=%d)", path, self.max_model_len)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.model = None

    # ---- generation ------------------------------------------------------------------------------------
    async def generate(self, messages: Messages, sampling: Sampling, deadline: float | None = None) -> list[Generation]:
        if self.model is None:
            raise generator_error(self.name, "not started")
        prompt_ids = render_prompt_ids(self.tokenizer, messages)
        check_prompt_fits(len(prompt_ids), self.max_model_len, sampling.max_tokens)
        stop = _Stop(threading.Event(), deadline)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, self._generate_sync, prompt_ids, sampling, stop)
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits
        try:
            return await asyncio.wait_for(asyncio.shield(work), remaining_s(deadline))
        except TimeoutError:
            raise deadline_error() from None
        except RewardServeError:
            raise
        except Exception as exc:  # not BaseException: cancellation goes on up
            log.exception("hf generation failed")
            raise generator_error(self.name, exc) from exc
        finally:
            stop.flag.set()  # whatever happened, the worker stops at its next token

    def _generate_sync(self, prompt_ids: list[int], sampling: Sampling, stop: _Stop) -> list[Generation]:
        import torch

        if stop.expired():
            raise deadline_error()
        max_new = min(sampling.max_tokens, self.max_model_len - len(prompt_ids))
        ids = torch.tensor([prompt_ids], device=self.device)  # (1, T)
        eos = self.tokenizer.eos_token_id
        greedy = sampling.temperature == 0  # one greedy answer, repeated n times
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new, "num_return_sequences": 1 if greedy else sampling.n, "do_sample": not greedy,
            "eos_token_id": eos, "pad_token_id": self.tokenizer.pad_token_id, "stopping_criteria": [stop],
        }
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with self._lock, torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # (n, T + new)
        if stop.expired():
            raise deadline_error()
        rows = [self._decode(row[len(prompt_ids):].tolist(), eos) for row in out]
        return rows * sampling.n if greedy else rows

    def _decode(self, new_ids: list[int], eos: int) -> Generation:
        if eos in new_ids:
            return Generation(self.tokenizer.decode(new_ids[: new_ids.index(eos)], skip_special_tokens=True), "stop")
        return Generation(self.tokenizer.decode(new_ids, skip_special_tokens=True), "length")
