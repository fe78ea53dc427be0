"""Process reward models (PRMs): a score at the end of every step of a response, not only at its end.

One convention, shared by `rewardserve train prm` and the server (no train/serve skew), the TRL PRMTrainer one:

    input ids = [BOS] + tokens(prompt) + tokens(step_1 + separator) + ... + tokens(step_n + separator)

each piece tokenized on its own without special tokens, BOS only when the tokenizer has one; a step's score is read
at the LAST token of its `step + separator` piece. An input longer than the model takes loses prompt tokens from
the left (the steps are what is scored); steps that do not fit even then are refused, as are steps that are empty.

A PRM checkpoint is a Hugging Face `AutoModelForTokenClassification` folder (TRL's PRMs, Qwen-PRM style) with
`rewardserve_prm.json` beside its config: the separator, and how a step's raw score is read from the logits at its
end token: with two labels (bad, good) the raw score is logit[good] - logit[bad] (the log-odds of a good step;
sigmoid of it is the softmax probability of "good"), with one label the logit itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from rewardmodel.rendering import RenderError, neutral_text, token_ids

PRM_META = "rewardserve_prm.json"
DEFAULT_SEPARATOR = "\n"


@dataclass(frozen=True)
class PRMSpec:
    step_separator: str = DEFAULT_SEPARATOR
    """Appended to every step before it is tokenized; its last token is where the step is read."""
    num_labels: int = 2
    """2: (bad, good) logits, read as logit[good] - logit[bad]; 1: one logit, read as is."""
    good_label: int = 1
    """The label index of a good step (two-label heads)."""

    def save(self, folder: str | Path) -> None:
        (Path(folder) / PRM_META).write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_prm_spec(folder: str | Path) -> PRMSpec | None:
    """The folder's PRM spec, or None when it is not a PRM checkpoint."""
    path = Path(folder) / PRM_META
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    spec = PRMSpec(**{k: data[k] for k in ("step_separator", "num_labels", "good_label") if k in data})
    if spec.num_labels not in (1, 2) or not 0 <= spec.good_label < spec.num_labels or not spec.step_separator:
        raise ValueError(f"{path}: num_labels must be 1 or 2, good_label a label index, step_separator non-empty")
    return spec


@dataclass(frozen=True)
class StepEncoded:
    input_ids: list[int]
    step_ends: list[int]
    """Index in input_ids of each step's last token (where its score is read), in step order."""
    truncated: bool
    """True when prompt tokens were dropped from the left to fit."""

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def encode_steps(tokenizer: Any, prompt: str, steps: Sequence[str], max_length: int,
                 separator: str = DEFAULT_SEPARATOR) -> StepEncoded:
    """Token ids of (prompt, steps) and the position of each step's end; see the module doc."""
    if not steps:
        raise RenderError("steps is empty: send at least one step")
    pieces = []
    for j, step in enumerate(steps):
        if not step.strip():
            raise RenderError(f"steps.{j} is empty: every step needs text")
        ids = token_ids(tokenizer, neutral_text(tokenizer, step) + separator, add_special_tokens=False)
        if not ids:
            raise RenderError(f"steps.{j} tokenizes to nothing")
        pieces.append(ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if bos is not None else []
    prompt_ids = token_ids(tokenizer, neutral_text(tokenizer, prompt), add_special_tokens=False) if prompt else []
    step_tokens = sum(len(p) for p in pieces)
    room = max_length - len(head) - step_tokens
    if room < 0:
        raise RenderError(f"steps: {len(steps)} steps need {step_tokens + len(head)} tokens, more than the "
                          f"{max_length} this model reads")
    truncated = len(prompt_ids) > room
    if truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - room:] if room else []
    ids = head + prompt_ids
    ends = []
    for piece in pieces:
        ids.extend(piece)
        ends.append(len(ids) - 1)
    return StepEncoded(ids, ends, truncated)


def split_steps(response: str, separator: str) -> list[str]:
    """A response cut into steps at `separator` (empty pieces, e.g. from a trailing separator, dropped)."""
    return [part for part in response.split(separator) if part.strip()]


def step_scores(logits: Any, spec: PRMSpec) -> Any:
    """Raw step scores from token-classification logits (..., num_labels) at the step ends."""
    if spec.num_labels == 1:
        return logits[..., 0]
    return logits[..., spec.good_label] - logits[..., 1 - spec.good_label]
