"""GRPO's rewards: a weighted mix of a reward model (in this process, or a rewardserve server) and rule rewards.

Components (`--reward-weights`, e.g. `model=1,answer=1`):
- model    the reward model's raw score of prompt + completion. With a server, every group (one prompt's G
           completions) is ONE request, so the server's shared-prefix grouping computes the prompt once; the
           prefix tokens it saved are read from its Prometheus counter `rewardserve_prefix_tokens_saved_total`
           (GET /metrics) before and after each step, when an HTTP address is known (the --reward-url itself when it
           is http(s)://, else --reward-metrics-url); unreachable metrics are skipped, never fatal.
- answer   rewardmodel.rules.answer_match of the completion against the prompt's reference answer (GSM8K `#### N`).
- format   rewardmodel.rules.format_match of the completion against --format-pattern (a safe-subset regex).
Default weights: model=1 when a reward model is given, else answer=1; --format-pattern adds format=1 unless the
weights name it. A failed model call raises RewardCallFailed (the step stops; no made-up rewards).
"""

from __future__ import annotations

import logging
import re
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch

from rewardmodel.rules import UnsafePattern, answer_match, compile_pattern, format_match
from training.rewards import LocalReward, RemoteReward, RewardCallFailed, _checked

log = logging.getLogger("rewardserve.train.grpo")

COMPONENTS = ("model", "answer", "format")
PREFIX_SAVED = "rewardserve_prefix_tokens_saved_total"


def parse_weights(text: str | None, has_model: bool, has_format: bool) -> dict[str, float]:
    """'model=1,answer=0.5' -> {"model": 1.0, "answer": 0.5}; None -> the defaults (module docstring)."""
    if not text:
        weights = {"model": 1.0} if has_model else {"answer": 1.0}
    else:
        weights = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in COMPONENTS:
                raise ValueError(f"--reward-weights: {part!r} is not NAME=WEIGHT with NAME one of {COMPONENTS}")
            weights[name] = float(value)
    if has_format and "format" not in weights:
        weights["format"] = 1.0
    if "model" in weights and not has_model:
        raise ValueError("--reward-weights names 'model' but no --reward-model or --reward-url is given")
    if "format" in weights and not has_format:
        raise ValueError("--reward-weights names 'format' but no --format-pattern is given")
    return weights


def metrics_url(reward_url: str | None, given: str | None) -> str | None:
    """Where the server's Prometheus text is: `given`, else the reward URL when it is HTTP."""
    if given:
        return given.rstrip("/") + "/metrics" if not given.rstrip("/").endswith("/metrics") else given
    if reward_url and urlparse(reward_url).scheme in ("http", "https"):
        return reward_url.rstrip("/") + "/metrics"
    return None


def read_counter(url: str, name: str = PREFIX_SAVED, timeout: float = 5.0) -> float | None:
    """The sum of a counter's samples (all label sets) in the Prometheus text at `url`; None when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        log.debug("could not read %s: %s", url, exc)
        return None
    sample = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", re.M)
    return sum(float(v) for v in sample.findall(text))


class GroupRemoteReward(RemoteReward):
    """A server scored one group per request (request id grpo-step-S-group-I)."""

    def score_group(self, inputs: Sequence[dict], step: int, group: int) -> list[float]:
        from clients import RewardClientError

        try:
            rewards = self.client.score(list(inputs), request_id=f"grpo-step-{step}-group-{group}")
        except RewardClientError as exc:
            raise RewardCallFailed(
                f"step {step}: {self.where} failed after {exc.attempts} attempt(s): {exc}") from exc
        return _checked(rewards, len(inputs), self.where)


class GroupRewards:
    """Scores a step's completions, group by group: the weighted total and each component, (N,) float32 each."""

    def __init__(self, config: Any):
        has_model = bool(config.reward_model or config.reward_url)
        self.weights = parse_weights(config.reward_weights, has_model, bool(config.format_pattern))
        self.pattern = config.format_pattern
        if self.pattern:
            try:
                compile_pattern(self.pattern)  # refuse an unsafe pattern before training starts
            except UnsafePattern as exc:
                raise UnsafePattern(f"--format-pattern {self.pattern!r}: {exc}") from None
        self.model: LocalReward | GroupRemoteReward | None = None
        if "model" in self.weights:
            self.model = (LocalReward(config.reward_model) if config.reward_model else
                          GroupRemoteReward(config.reward_url, config.reward_timeout, config.reward_retries,
                                            config.reward_api_key, getattr(config, "reward_model_name", None)))
        self.metrics_url = metrics_url(config.reward_url, config.reward_metrics_url) if self.model else None
        self.where = ", ".join(f"{k}x{v:g}" + (f" ({self.model.where})" if k == "model" else "")
                               for k, v in self.weights.items())

    def check_references(self, references: Sequence[str | None]) -> None:
        if "answer" in self.weights and any(r is None for r in references):
            missing = sum(r is None for r in references)
            raise ValueError(f"the answer reward needs a reference answer for every prompt ('answer' or "
                             f"'reference'); {missing} prompt(s) have none")

    def score(self, groups: Sequence[tuple[list[dict], str | None, list[str]]], step: int
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """groups: (prompt messages, reference answer, the G completion texts) per prompt.
        Returns (total (N,), {component: (N,)} plus "prefix_tokens_saved" (0-dim) when the server says)."""
        parts: dict[str, torch.Tensor] = {}
        if "answer" in self.weights:
            parts["answer"] = torch.tensor([answer_match(t, ref) for _, ref, texts in groups for t in texts])
        if "format" in self.weights:
            parts["format"] = torch.tensor([format_match(t, self.pattern) for _, _, texts in groups for t in texts])
        extra: dict[str, torch.Tensor] = {}
        if self.model is not None:
            before = read_counter(self.metrics_url) if self.metrics_url else None
            parts["model"] = self._model_scores(groups, step)
            after = read_counter(self.metrics_url) if before is not None else None
            if after is not None:
                extra["prefix_tokens_saved"] = torch.tensor(after - before)
        total = sum(self.weights[k] * v.float() for k, v in parts.items())
        return total.float(), {**{k: v.float() for k, v in parts.items()}, **extra}

    def _model_scores(self, groups: Sequence[tuple[list[dict], str | None, list[str]]], step: int) -> torch.Tensor:
        inputs = [[{"messages": [*messages, {"role": "assistant", "content": t}]} for t in texts]
                  for messages, _, texts in groups]
        if isinstance(self.model, GroupRemoteReward):
            scores = [s for i, group in enumerate(inputs) for s in self.model.score_group(group, step, i)]
        else:
            scores = self.model.score([x for group in inputs for x in group], step)
        return torch.tensor(scores, dtype=torch.float32)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
