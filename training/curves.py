"""Training curves from a run's metrics.jsonl as one small PNG (used for the plots in docs/training.md).

    python -m training.curves runs/ppo/metrics.jsonl docs/img/ppo.png train/reward_mean train/kl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def series(metrics: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if key in row:
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def plot(metrics: Path, out: Path, keys: list[str], title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, values = series(metrics, key)
        ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, linewidth=1.0,
                alpha=0.45 if len(steps) >= 20 else 1.0)
        if len(steps) >= 20:  # noisy per-step values: a centred 9-step mean on top
            half = 4
            smooth = [sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, linewidth=1.6, color="C1")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    plot(Path(argv[0]), Path(argv[1]), argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
