"""Scoring that never raises, for reward functions with `on_error="none"` (TRL turns a None reward into NaN and
leaves it out of that sample's sum).

Each failure costs only the completions it concerns: a pair that cannot be converted gets None alone; when the
server (or the client's own checks) refuses a batch as invalid input, the batch is halved until each refused
input is alone, so only those get None (an unknown model refuses every input: no halving); any other failure
(server down after the retries, a malformed answer, a bug) gives None to the part of the batch that was in
flight. Every failure is kept in `errors` for the caller to report.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence

from .errors import InvalidInputError, NotFoundError

Scorer = Callable[[list[dict]], Sequence[Any]]
AsyncScorer = Callable[[list[dict]], Awaitable[Sequence[Any]]]


def expected_count(prompts: Any, completions: Any) -> int:
    """How many rewards the trainer expects (TRL checks against the number of prompts)."""
    for items in (prompts, completions):
        try:
            return len(items)
        except Exception:  # noqa: BLE001 - not sized: try the other
            continue
    return 0


def lenient_inputs(convert: Callable[[int, Any, Any], dict], prompts: Sequence[Any], completions: Sequence[Any],
                   errors: list[BaseException]) -> list[dict | None]:
    """`convert(i, prompt, completion)` for each pair; None where it fails."""
    if len(prompts) != len(completions):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(completions)} completions",
                                type="invalid_argument")
    out: list[dict | None] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            out.append(convert(i, prompt, completion))
        except Exception as exc:  # noqa: BLE001 - this pair gets None
            errors.append(exc)
            out.append(None)
    return out


def _splits(exc: Exception, count: int) -> bool:
    """Whether halving the batch can isolate the inputs that caused `exc`."""
    return isinstance(exc, InvalidInputError) and not isinstance(exc, NotFoundError) and count > 1


def _checked(results: Sequence[Any], count: int) -> list[Any]:
    results = list(results)
    if len(results) != count:
        raise ValueError(f"{len(results)} results for {count} inputs")
    return results


def score_isolating(score: Scorer, inputs: list[dict], errors: list[BaseException]) -> list[Any]:
    """`score(inputs)`, with None for the inputs whose scoring failed (see the module docstring)."""
    try:
        return _checked(score(inputs), len(inputs))
    except Exception as exc:  # noqa: BLE001 - turned into None rewards
        if not _splits(exc, len(inputs)):
            errors.append(exc)
            return [None] * len(inputs)
    mid = len(inputs) // 2
    return score_isolating(score, inputs[:mid], errors) + score_isolating(score, inputs[mid:], errors)


async def ascore_isolating(score: AsyncScorer, inputs: list[dict], errors: list[BaseException]) -> list[Any]:
    """As `score_isolating`, for a coroutine `score`; the two halves of a refused batch go concurrently."""
    try:
        return _checked(await score(inputs), len(inputs))
    except Exception as exc:  # noqa: BLE001 - turned into None rewards (cancellation is not an Exception)
        if not _splits(exc, len(inputs)):
            errors.append(exc)
            return [None] * len(inputs)
    mid = len(inputs) // 2
    left, right = await asyncio.gather(ascore_isolating(score, inputs[:mid], errors),
                                       ascore_isolating(score, inputs[mid:], errors))
    return left + right


def spread(inputs: list[dict | None], results: list[Any]) -> list[Any]:
    """The results of the present inputs put back in place, None where an input is missing."""
    found = iter(results)
    return [None if item is None else next(found) for item in inputs]
