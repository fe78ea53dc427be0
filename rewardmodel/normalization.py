"""Raw -> normalized rewards with the mean and std measured on the model's eval set at training time.

A checkpoint directory may hold `reward_stats.json`: {"mean": float, "std": float, ...}. A normalized value
is only ever returned beside the raw reward, never instead of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

STATS_FILE = "reward_stats.json"


@dataclass(frozen=True)
class RewardStats:
    mean: float
    std: float

    def normalize(self, reward: float) -> float:
        return (reward - self.mean) / self.std

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def load_stats(model_dir: str | Path, head: str | None = None) -> RewardStats | None:
    """The model's stats (a multi-head overlay: one head's, from `{"heads": {name: {...}}}`), or None."""
    data = stats_block(model_dir, head)
    if data is None or "mean" not in data:
        return None
    mean, std = float(data["mean"]), float(data["std"])
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise ValueError(f"{Path(model_dir) / STATS_FILE}: mean must be finite and std positive, got {data}")
    return RewardStats(mean, std)


def stats_block(model_dir: str | Path, head: str | None = None) -> dict | None:
    """The raw reward_stats.json entry of the model (or of one head of a multi-head overlay), with any `length`
    debias fit; None when there is none."""
    path = Path(model_dir) / STATS_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if head is not None:
        data = (data.get("heads") or {}).get(head)
    return data if isinstance(data, dict) else None


def save_stats(model_dir: str | Path, stats: RewardStats, **extra: object) -> None:
    (Path(model_dir) / STATS_FILE).write_text(json.dumps({**stats.to_json(), **extra}, indent=2) + "\n")
