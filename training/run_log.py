"""The training loop's run log: metrics.jsonl, TensorBoard and the progress bar (RunLog), and the windows of step
metrics averaged between two log lines (Window). Only the main process writes; see training/loop.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from training import checkpoint as ckpt

from training.types import Metrics, TrainConfig, TrainState


class RunLog:
    """metrics.jsonl + TensorBoard + the progress bar; only the main process writes."""

    def __init__(self, out: Path, config: TrainConfig, total: int, state: TrainState, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        out.mkdir(parents=True, exist_ok=True)
        self._truncate_after(state.step)  # a resumed run rewrites what came after its checkpoint
        # On resume, TensorBoard hides what a killed run logged after the checkpoint (steps > state.step).
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=state.step + 1 if state.step else None)
        self.bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not config.progress)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        ckpt.atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, step)
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k in ("train/loss", "train/accuracy", "eval/accuracy")}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.bar.close()


class Window:
    """Item-weighted sums of the step metrics since the last log, and the seconds spent stepping."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}  # items behind each key's sum (keys may come from different adds)
        self.items, self.steps, self.seconds = 0, 0, 0.0

    def add(self, metrics: Metrics, items: int, count: bool = True) -> None:
        """count: the items also count for time/items_per_s (PPO counts rollouts, not their minibatch reuses)."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float() * items
            self.weights[key] = self.weights.get(key, 0.0) + items
        self.items += items if count else 0

    def flush(self, accelerator: Any) -> dict[str, float]:
        """Means over the window (all processes), then reset."""
        keys = sorted(self.sums)
        device = accelerator.device
        local = torch.stack([torch.as_tensor(self.sums[k], device=device) for k in keys]
                            + [torch.tensor(self.weights[k], device=device) for k in keys]
                            + [torch.tensor(float(self.items), device=device)])
        totals = accelerator.reduce(local.to(device), reduction="sum").tolist()  # (2K + 1,)
        items, steps = totals[-1], max(self.steps, 1)
        out = {f"train/{k}": s / w for k, s, w in zip(keys, totals, totals[len(keys) : 2 * len(keys)])}
        out |= {"time/step_s": self.seconds / steps, "time/items_per_s": items / max(self.seconds, 1e-9)}
        self.__init__()
        return out
