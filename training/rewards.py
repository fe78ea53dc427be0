"""Where PPO's scores come from: a reward model in this process, or a rewardserve server through clients/.

Both take rewardserve inputs ({"messages": [...]}, the prompt plus the sampled response) and return one raw reward
per input. Anything that is not exactly one finite number per input raises RewardCallFailed: a failed call never
becomes a reward of 0.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch

log = logging.getLogger("rewardserve.train.rewards")


class RewardCallFailed(RuntimeError):
    """Scoring the rollouts failed; the PPO step stops here (no made-up rewards)."""


def _checked(rewards: Sequence[float], expected: int, where: str) -> list[float]:
    values = [float(r) for r in rewards]
    if len(values) != expected:
        raise RewardCallFailed(f"{where} returned {len(values)} rewards for {expected} rollouts")
    bad = [i for i, r in enumerate(values) if not math.isfinite(r)]
    if bad:
        raise RewardCallFailed(f"{where} returned non-finite rewards for rollouts {bad[:5]}")
    return values


class LocalReward:
    """A reward model folder, scored here with the service's own rendering and reward head."""

    def __init__(self, model_dir: str, batch_size: int = 16, device: str = "cpu"):
        from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model
        from rewardmodel.rendering import model_max_length

        source = resolve_model(model_dir)
        self.where = f"reward model {source.path}"
        self.tokenizer = load_tokenizer(source)
        self.model = load_reward_model(source, torch.float32, device)
        self.max_length = model_max_length(self.tokenizer, self.model.config)
        self.batch_size, self.device = batch_size, device
        pad = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @torch.no_grad()
    def score(self, inputs: Sequence[dict], step: int) -> list[float]:
        from rewardmodel.modeling import reward_forward
        from rewardmodel.rendering import encode_input
        from training.data import pad_right

        out: list[float] = []
        try:
            for start in range(0, len(inputs), self.batch_size):
                rows = [encode_input(self.tokenizer, x, self.max_length).input_ids for x in inputs[start : start + self.batch_size]]
                ids, mask = pad_right(rows, self.pad_id)  # (b, T)
                out += reward_forward(self.model, ids.to(self.device), mask.to(self.device)).tolist()
        except Exception as exc:
            raise RewardCallFailed(f"step {step}: {self.where} failed: {exc}") from exc
        return _checked(out, len(inputs), self.where)

    def close(self) -> None:
        pass


class RemoteReward:
    """A rewardserve server: http(s)://host:port or grpc://host:port (grpcs:// for TLS), with the clients' retries
    (overload backoff, failover) inside one deadline per call."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, api_key: str | None = None,
                 model: str | None = None):
        from clients import GrpcRewardClient, RewardClient

        parsed = urlparse(url)
        api_key = api_key or os.environ.get("REWARDSERVE_API_KEY") or None
        options: dict[str, Any] = {"timeout": timeout, "max_retries": retries, "api_key": api_key, "model": model}
        if parsed.scheme in ("http", "https"):
            self.client: Any = RewardClient(url, **options)
        elif parsed.scheme in ("grpc", "grpcs") and parsed.netloc:
            self.client = GrpcRewardClient(parsed.netloc, tls=parsed.scheme == "grpcs", **options)
        else:
            raise ValueError(f"--reward-url {url!r}: use http://host:port, https://…, grpc://host:port or grpcs://…")
        self.where = f"reward server {url}" + (f" (model {model})" if model else "")

    def score(self, inputs: Sequence[dict], step: int) -> list[float]:
        from clients import RewardClientError

        try:
            rewards = self.client.score(list(inputs), request_id=f"ppo-step-{step}")
        except RewardClientError as exc:
            raise RewardCallFailed(
                f"step {step}: {self.where} failed after {exc.attempts} attempt(s): {exc}") from exc
        return _checked(rewards, len(inputs), self.where)

    def close(self) -> None:
        self.client.close()


def make_scorer(reward_model: str | None, reward_url: str | None, timeout: float, retries: int,
                api_key: str | None, model_name: str | None = None) -> LocalReward | RemoteReward:
    if (reward_model is None) == (reward_url is None):
        raise ValueError("give exactly one of reward_model (a folder) and reward_url (a server)")
    if reward_model is not None:
        return LocalReward(reward_model)
    return RemoteReward(reward_url, timeout, retries, api_key, model_name)
