"""Scoring that never raises, for reward functions with `on_error="none"` (TRL turns a None reward into NaN and
leaves it out of that sample's sum).

Each failure costs only the completions it concerns. The inputs are sent as requests of `batch_size` (the
client's `max_batch_size`), each on its own, so a failed request costs only its own inputs: the rewards of the
others are kept. A pair that cannot be converted gets None alone. When the server (or the client's own checks)
refuses a request as invalid input, or the model fails on it (`backend_error`: e.g. one input makes it produce a
non-finite reward), the request is halved until each guilty input is alone, so only those get None (an unknown
model refuses every input: no halving); any other failure (server down after the retries, a malformed answer, a
bug) gives None to that request's inputs. Every failure is kept in `errors` for the caller to report, an
`inputs.K` in its message counting from the first input of the whole call (`positions`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable, Sequence

from .errors import InvalidInputError, NotFoundError, RewardClientError, ServerError

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


BACKEND_ERROR = "backend_error"  # the server's error type when the model failed on an input


def _splits(exc: Exception, count: int) -> bool:
    """Whether halving the batch can isolate the inputs that caused `exc`."""
    if count <= 1 or isinstance(exc, NotFoundError):
        return False
    return isinstance(exc, InvalidInputError) or (isinstance(exc, ServerError) and exc.type == BACKEND_ERROR)


def _checked(results: Sequence[Any], count: int) -> list[Any]:
    results = list(results)
    if len(results) != count:
        raise ValueError(f"{len(results)} results for {count} inputs")
    return results


def _renumbered(exc: Exception, positions: Sequence[int]) -> Exception:
    """`exc` with its `inputs.K` (K counted within the request) naming the input's place in the whole call."""
    if isinstance(exc, RewardClientError):
        def place(match: re.Match) -> str:
            k = int(match.group(1))
            return f"inputs.{positions[k]}" if k < len(positions) else match.group(0)

        exc.message = re.sub(r"\binputs\.(\d+)", place, exc.message)
        exc.args = (exc.message,)
    return exc


def _batches(count: int, batch_size: int | None) -> list[slice]:
    size = max(batch_size or count, 1)
    return [slice(start, start + size) for start in range(0, count, size)]


def score_isolating(score: Scorer, inputs: list[dict], errors: list[BaseException], batch_size: int | None = None,
                    positions: Sequence[int] | None = None) -> list[Any]:
    """`score(inputs)` by requests of `batch_size`, with None for the inputs whose scoring failed (see the
    module docstring). `positions`: each input's index in the caller's call (default: its index here)."""
    places = list(range(len(inputs))) if positions is None else list(positions)
    out: list[Any] = []
    for part in _batches(len(inputs), batch_size):
        out += _isolate(score, inputs[part], places[part], errors)
    return out


def _isolate(score: Scorer, inputs: list[dict], positions: list[int], errors: list[BaseException]) -> list[Any]:
    try:
        return _checked(score(inputs), len(inputs))
    except Exception as exc:  # noqa: BLE001 - turned into None rewards
        if not _splits(exc, len(inputs)):
            errors.append(_renumbered(exc, positions))
            return [None] * len(inputs)
    mid = len(inputs) // 2
    return (_isolate(score, inputs[:mid], positions[:mid], errors)
            + _isolate(score, inputs[mid:], positions[mid:], errors))


async def ascore_isolating(score: AsyncScorer, inputs: list[dict], errors: list[BaseException],
                           batch_size: int | None = None, concurrency: int | None = None,
                           positions: Sequence[int] | None = None) -> list[Any]:
    """As `score_isolating`, for a coroutine `score`: at most `concurrency` requests at a time (their halvings
    aside: the two halves of a refused request go concurrently)."""
    places = list(range(len(inputs))) if positions is None else list(positions)
    parts = _batches(len(inputs), batch_size)
    limit = asyncio.Semaphore(max(concurrency or len(parts), 1))

    async def one(part: slice) -> list[Any]:
        async with limit:
            return await _aisolate(score, inputs[part], places[part], errors)

    return [result for chunk in await asyncio.gather(*(one(part) for part in parts)) for result in chunk]


async def _aisolate(score: AsyncScorer, inputs: list[dict], positions: list[int],
                    errors: list[BaseException]) -> list[Any]:
    try:
        return _checked(await score(inputs), len(inputs))
    except Exception as exc:  # noqa: BLE001 - turned into None rewards (cancellation is not an Exception)
        if not _splits(exc, len(inputs)):
            errors.append(_renumbered(exc, positions))
            return [None] * len(inputs)
    mid = len(inputs) // 2
    left, right = await asyncio.gather(_aisolate(score, inputs[:mid], positions[:mid], errors),
                                       _aisolate(score, inputs[mid:], positions[mid:], errors))
    return left + right


def spread(inputs: list[dict | None], results: list[Any]) -> list[Any]:
    """The results of the present inputs put back in place, None where an input is missing."""
    found = iter(results)
    return [None if item is None else next(found) for item in inputs]
