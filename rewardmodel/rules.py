"""Rule rewards: checks on a response's text that need no model. Pure Python (no torch), no code execution.

Shared by the GRPO trainer (training/grpo_rewards.py) and, later, by the server's ensembles:

- `extract_answer(text)`      the final answer of GSM8K-style text: after the last `####`, else inside the last
                              `\\boxed{...}`, else the last number anywhere; normalised (`normalize_number`).
- `answer_match(text, ref)`   1.0 when the two final answers are the same number, else 0.0.
- `format_match(text, pat)`   1.0 when the text matches a regular expression from a safe subset, else 0.0.
- `length_penalty(n, target, per_token)`   -per_token x (tokens beyond target): 0 or negative.

Numbers: `1,234`, `-7`, `+7`, `3.50`, `.5`, `$18`, `-$3`, `50%` are read; `42`, `42.0` and `42.00` are the same
answer (compared as decimals, printed without trailing zeros or exponent). A `%` or `$` is decoration: `50%` and
`50` match. Fractions and words ("forty-two") are not read.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache

try:  # the regular-expression parser (Python >= 3.11); used only to vet format patterns
    import re._constants as _sre_c
    import re._parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "MAX_PATTERN_CHARS", "MAX_TEXT_CHARS", "UnsafePattern", "answer_match", "compile_pattern", "extract_answer",
    "format_match", "length_penalty", "normalize_number",
]

# A sign counts only where it cannot be a hyphen or a minus between two numbers ("3-4" is 3 and 4). Thousands groups
# must be exact (in "1,2345" only the 1 is read). Decimals need a digit after the point ("42." is 42).
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<sign>[-+\u2212])\$?|(?<![\w.,$])\$?)"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?!\d)"
)
_HASHES = "####"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def normalize_number(text: str) -> str | None:
    """A number's canonical spelling: commas, `$`, `%` and a leading `+` dropped, trailing zeros dropped, no
    exponent, `-0` is `0`. None when `text` holds no number; e.g. `"$1,234.50"` -> `"1234.5"`, `"42.00"` -> `"42"`."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    return _canonical(match)


def _canonical(match: re.Match) -> str | None:
    digits = match.group("digits").replace(",", "")
    negative = match.group("sign") in ("-", "\u2212")
    try:
        value = Decimal(digits)
    except InvalidOperation:  # pragma: no cover - the pattern only matches decimals
        return None
    if negative:
        value = -value
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    return out


def _last_number(text: str) -> str | None:
    found = None
    for found in _NUMBER.finditer(text):
        pass
    return None if found is None else _canonical(found)


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised (see `normalize_number`), or None when there is none.

    In order: the first number after the last `####` (GSM8K's convention; nothing there: None); else the first
    number inside the last `\\boxed{...}` (None for a fraction there); else the last number in the text.
    """
    if _HASHES in text:
        return normalize_number(text.rsplit(_HASHES, 1)[1])
    boxed = _last_boxed(text)
    if boxed is not None:
        return None if "\\frac" in boxed or "/" in boxed else normalize_number(boxed)  # fractions: not read
    return _last_number(text)


def answer_match(text: str, reference: str) -> float:
    """1.0 when `text`'s final answer equals the reference's (GSM8K `answer` text with `#### N`, or a bare number);
    0.0 otherwise, and when either has no answer."""
    got, want = extract_answer(text), extract_answer(reference)
    return 1.0 if got is not None and got == want else 0.0


# ------------------------------------------------------------------------------------------------ format

MAX_PATTERN_CHARS = 256
"""Longest pattern accepted."""
MAX_TEXT_CHARS = 8192
"""Longest text a pattern is run on; a longer text does not match (0.0)."""
MAX_UNBOUNDED_REPEATS = 2
"""Repeats without a small upper bound (`*`, `+`, `{n,}`, `{n,m}` with m > 64) a pattern may hold: with two, the
worst case is quadratic in the text (about 10 ms at MAX_TEXT_CHARS); three made a 4,096-character text take 9 s."""
_BOUNDED = 64


class UnsafePattern(ValueError):
    """A format pattern outside the safe subset (too long, backreferences, nested or alternating repeats, ...)."""


def _vet(items: list, inside_repeat: bool, counts: list[int]) -> None:
    """Walk a parsed pattern; raise UnsafePattern on a construct that can backtrack without bound."""
    for op, arg in items:
        if op in (_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS):
            raise UnsafePattern("backreferences are not allowed")
        if op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", None)):
            low, high, body = arg
            if inside_repeat and high > 1:
                raise UnsafePattern("nested repeats (like (a+)+) are not allowed")
            if high is _sre_c.MAXREPEAT or high > _BOUNDED:
                counts[0] += 1
            _vet(list(body), inside_repeat or high > 1, counts)
        elif op is _sre_c.BRANCH:
            if inside_repeat:
                raise UnsafePattern("alternation inside a repeat (like (a|ab)*) is not allowed")
            for branch in arg[1]:
                _vet(list(branch), inside_repeat, counts)
        elif op is _sre_c.SUBPATTERN:
            _vet(list(arg[-1]), inside_repeat, counts)
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            _vet(list(arg[1]), inside_repeat, counts)
        elif op is getattr(_sre_c, "ATOMIC_GROUP", None):
            _vet(list(arg), inside_repeat, counts)


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern:
    """`pattern` compiled with re.DOTALL after checking it lies in the safe subset; UnsafePattern otherwise.

    The subset: at most MAX_PATTERN_CHARS characters; no backreferences or conditionals; no repeat inside a repeat;
    no alternation inside a repeat; at most MAX_UNBOUNDED_REPEATS repeats without a bound <= 64. Together with
    MAX_TEXT_CHARS this bounds the matching time without a timeout.
    """
    if not isinstance(pattern, str) or not pattern:
        raise UnsafePattern("the pattern must be a non-empty string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafePattern(f"the pattern has {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are allowed")
    try:
        parsed = _sre_parse.parse(pattern, re.DOTALL)
    except re.error as exc:
        raise UnsafePattern(f"not a regular expression: {exc}") from None
    counts = [0]
    _vet(list(parsed), False, counts)
    if counts[0] > MAX_UNBOUNDED_REPEATS:
        raise UnsafePattern(f"the pattern has {counts[0]} unbounded repeats; at most {MAX_UNBOUNDED_REPEATS} are "
                            f"allowed (bound the others, e.g. \\s{{0,8}})")
    return re.compile(pattern, re.DOTALL)


def format_match(text: str, pattern: str, full: bool = True) -> float:
    """1.0 when `text` matches `pattern` (the whole text when `full`, else anywhere), else 0.0.

    The pattern must lie in the safe subset (`compile_pattern`; UnsafePattern otherwise); `.` matches newlines.
    A text longer than MAX_TEXT_CHARS does not match.
    """
    compiled = compile_pattern(pattern)
    if len(text) > MAX_TEXT_CHARS:
        return 0.0
    found = compiled.fullmatch(text) if full else compiled.search(text)
    return 1.0 if found is not None else 0.0


# ------------------------------------------------------------------------------------------------ length


def length_penalty(tokens: int, target: int, per_token: float) -> float:
    """-per_token x max(0, tokens - target): nothing up to `target` tokens, then a linear penalty per extra token.

    tokens: the response's length, counted by the caller (with its own tokenizer); target >= 0; per_token >= 0.
    """
    if tokens < 0 or target < 0:
        raise ValueError(f"tokens and target must be >= 0; got {tokens} and {target}")
    if per_token < 0:
        raise ValueError(f"per_token must be >= 0, got {per_token}")
    return -per_token * max(0, tokens - target)
