"""What the clients take and give: input forms, results, model info, and batch splitting."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

from .errors import InvalidInputError, ServerError

# One input: {"prompt", "response"}, {"messages": [...]}, {"raw"} as the server takes them,
# or for convenience a (prompt, response) tuple or a plain string (= raw).
InputLike = Union[Mapping[str, Any], tuple, str]


@dataclass(frozen=True)
class ScoreResult:
    """The score of one input. `reward` is the raw logit (an ensemble's combined reward; a process reward model's
    last step score); `normalized` is set only when asked for; `step_rewards` for a process reward model;
    `members` (each member's reward) and `std` for an ensemble."""

    reward: float
    truncated: bool
    tokens: int
    normalized: float | None = None
    step_rewards: list[float] | None = None
    members: dict[str, float] | None = None
    std: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A served model or ensemble; `normalization` is (mean, std) when the model can normalize rewards; `kind` is
    "model", "prm" or "ensemble" (with its `members` and their weights)."""

    id: str
    max_model_len: int
    normalization: tuple[float, float] | None = None
    kind: str = "model"
    members: dict[str, float] | None = None


def check_text(value: Any, where: str = "") -> None:
    """Every string in `value` (nested in dicts and lists) is valid Unicode: a lone UTF-16 surrogate cannot be
    sent as UTF-8 (JSON or protobuf), so it is an InvalidInputError naming the field, raised before sending."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{where}: a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x}) at "
                                    f"character {exc.start}: send valid Unicode", type="invalid_argument") from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{where}.{i}" if where else str(i))


def to_input_dict(index: int, item: InputLike) -> dict[str, Any]:
    """One input as the server's JSON form. Dicts pass through (the server validates them); text must be valid
    Unicode."""
    if isinstance(item, str):
        check_text(item, f"inputs.{index}.raw")
        return {"raw": item}
    if isinstance(item, tuple):
        if len(item) != 2 or not all(isinstance(s, str) for s in item):
            raise InvalidInputError(f"inputs.{index}: a tuple input is (prompt, response), two strings",
                                    type="invalid_argument")
        check_text({"prompt": item[0], "response": item[1]}, f"inputs.{index}")
        return {"prompt": item[0], "response": item[1]}
    if isinstance(item, Mapping):
        check_text(item, f"inputs.{index}")
        return dict(item)
    raise InvalidInputError(
        f"inputs.{index}: an input is a dict ({{'prompt', 'response'}}, {{'messages'}} or {{'raw'}}), "
        f"a (prompt, response) tuple or a string, got {type(item).__name__}", type="invalid_argument")


def to_input_dicts(inputs: Iterable[InputLike]) -> list[dict[str, Any]]:
    if isinstance(inputs, (str, Mapping)):
        raise InvalidInputError("inputs is a list of inputs; wrap a single input in a list",
                                type="invalid_argument")
    items = [to_input_dict(i, item) for i, item in enumerate(inputs)]
    if not items:
        raise InvalidInputError("inputs is empty: send at least one input", type="invalid_argument")
    return items


def split(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive chunks of at most `size` items (their concatenation is `items`)."""
    if size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def chunk_request_ids(request_id: str | None, count: int) -> list[str]:
    """One id per chunk: the caller's (or a fresh) id, suffixed `-<i>` when the call is split."""
    base = request_id or uuid.uuid4().hex
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


def check_count(results: list[ScoreResult], expected: int, endpoint: str) -> list[ScoreResult]:
    """The answer's results, checked: one per input, and every reward a finite number (rewardserve never answers
    NaN or inf; another server or a proxy might, and a NaN reward would poison a training step silently)."""
    if len(results) != expected:
        raise ServerError(f"{len(results)} scores for {expected} inputs", type="bad_response",
                          endpoint=endpoint)
    for i, r in enumerate(results):
        if not math.isfinite(r.reward):
            raise ServerError(f"inputs.{i}: the server answered a non-finite reward ({r.reward})",
                              type="bad_response", endpoint=endpoint)
    return results
