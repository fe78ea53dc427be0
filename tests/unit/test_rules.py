"""rewardmodel.rules: answer extraction and matching, safe format patterns, the length penalty (examples and
hypothesis properties)."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardmodel.rules import (
    MAX_PATTERN_CHARS,
    MAX_TEXT_CHARS,
    UnsafePattern,
    answer_match,
    compile_pattern,
    extract_answer,
    format_match,
    length_penalty,
    normalize_number,
)


# ------------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48 clips in April.\nShe sold 24 in May.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### $1,234.50", "1234.5"),
    ("#### -7", "-7"),
    ("#### 42.00", "42"),
    ("#### 12 apples, not 13", "12"),  # the first number after the marker
    ("5 + 3 = 8 #### 8 and then 9", "8"),
    ("#### nothing", None),  # a marker without a number: no answer (not the 5 before it)
    ("5 #### ", None),
    ("So the answer is \\boxed{-42.50}.", "-42.5"),
    ("\\boxed{1} then \\boxed{2,000}", "2000"),  # the last box
    ("\\boxed{x^{2}} is 9", "2"),  # braces nest
    ("\\boxed{\\frac{1}{2}}", None),  # fractions are not read
    ("He pays $18.", "18"),
    ("It costs -$3 or so", "-3"),
    ("\u22127 degrees", "-7"),
    ("+5", "5"),
    ("50% of them", "50"),
    ("between 3-4 hours", "4"),  # a hyphen between numbers is no sign
    ("1, 2, 3", "3"),
    ("v1.2.3 and abc123", None),  # numbers inside words are not read
    (".5 liters", "0.5"),
    ("-0.0", "0"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text,ref,want", [
    ("The total is 42.0 dollars", "Some work.\n#### 42", 1.0),
    ("The total is $42", "42", 1.0),
    ("#### 1,000", "1000.00", 1.0),
    ("#### 41", "#### 42", 0.0),
    ("no answer", "#### 42", 0.0),
    ("#### 42", "no reference answer", 0.0),
    ("", "", 0.0),  # two missing answers are no match
])
def test_answer_match(text, ref, want):
    assert answer_match(text, ref) == want


def test_normalize_number():
    assert normalize_number("$1,234.500") == "1234.5"
    assert normalize_number("1e5") == "1"  # no exponents: the 1 is read, not 100000 (and 5 is inside a word)
    assert normalize_number("100") == "100"  # trailing zeros of an integer stay
    assert normalize_number("nothing") is None


def _spell(value: Decimal, commas: bool, zeros: int, dollar: bool, percent: bool) -> str:
    sign = "-" if value < 0 else ""
    whole, _, frac = format(abs(value), "f").partition(".")
    if commas:
        whole = f"{int(whole):,}"
    frac = frac + "0" * zeros
    body = whole + ("." + frac if frac else "")
    return f"{sign}{'$' if dollar else ''}{body}{'%' if percent else ''}"


numbers = st.decimals(min_value=-10**9, max_value=10**9, places=3, allow_nan=False, allow_infinity=False)


@given(numbers, st.booleans(), st.integers(0, 3), st.booleans(), st.booleans(), st.booleans())
def test_any_spelling_of_a_number_matches_its_plain_form(value, commas, zeros, dollar, percent, marker):
    spelled = _spell(value, commas, zeros, dollar, percent)
    text = f"Work: 3 + 4 = 7.\n#### {spelled}" if marker else f"so we get {spelled}."
    assert extract_answer(text) == normalize_number(format(value, "f"))
    assert answer_match(text, f"#### {format(value, 'f')}") == 1.0
    assert answer_match(text, f"#### {format(value + 1, 'f')}") == 0.0


@given(st.text(max_size=300), st.text(max_size=60))
def test_answer_match_is_zero_or_one_and_never_raises(text, ref):
    assert answer_match(text, ref) in (0.0, 1.0)
    answer = extract_answer(text)
    assert answer is None or Decimal(answer) == Decimal(answer).normalize()


@given(st.integers(-10**12, 10**12))
def test_gsm8k_answers_round_trip(n):
    assert extract_answer(f"step one\nstep two\n#### {n:,}") == str(n)


# ------------------------------------------------------------------------------------------------- format

THINK = r"<think>.*?</think>\s{0,8}<answer>.*?</answer>"


def test_format_match_examples():
    assert format_match("<think>a\nb</think>\n<answer>42</answer>", THINK) == 1.0  # . matches newlines
    assert format_match("<think>a</think><answer>42</answer> extra", THINK) == 0.0  # full match by default
    assert format_match("<think>a</think><answer>42</answer> extra", THINK, full=False) == 1.0
    assert format_match("#### 12", r"#### -?\d+") == 1.0
    assert format_match("x" * (MAX_TEXT_CHARS + 1), r"x+") == 0.0  # too long: no match


@pytest.mark.parametrize("pattern,why", [
    ("a" * (MAX_PATTERN_CHARS + 1), "characters"),
    (r"(a)\1", "backreferences"),
    (r"(?P<x>a)(?P=x)", "backreferences"),
    (r"(a)?(?(1)b|c)", "backreferences"),
    (r"(a+)+b", "nested"),
    (r"(?:a{2,3}){1,5}", "nested"),
    (r"(?:a|ab)*c", "alternation"),
    (r".*.*.*x", "unbounded"),
    (r"a{0,100}b{0,100}c{0,100}", "unbounded"),
    (r"(", "not a regular expression"),
    ("", "non-empty"),
])
def test_unsafe_patterns_are_refused(pattern, why):
    with pytest.raises(UnsafePattern, match=why):
        format_match("text", pattern)


def test_allowed_patterns_stay_fast_on_their_worst_texts():
    """The safe subset's worst case (two unbounded repeats that fail at the end) on the longest text."""
    compile_pattern(r"a{0,64}b{0,64}c{0,64}")  # small bounds do not count
    started = time.perf_counter()
    assert format_match("a" * MAX_TEXT_CHARS, r".*.*x") == 0.0
    assert format_match("<think>" * (MAX_TEXT_CHARS // 7), THINK) == 0.0
    assert time.perf_counter() - started < 1.0


@settings(max_examples=200)
@given(st.text(max_size=500))
def test_format_match_returns_zero_or_one_on_any_text(text):
    assert format_match(text, THINK) in (0.0, 1.0)
    for pattern in (THINK, r"\d+", r"[a-z]{1,5}"):
        assert format_match(text, pattern, full=False) >= format_match(text, pattern)  # a full match is a match


# ------------------------------------------------------------------------------------------------- length


def test_length_penalty_examples():
    assert length_penalty(10, 20, 0.01) == 0.0
    assert length_penalty(20, 20, 0.01) == 0.0
    assert length_penalty(25, 20, 0.1) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        length_penalty(-1, 20, 0.1)
    with pytest.raises(ValueError):
        length_penalty(1, 20, -0.1)


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.floats(0, 10, allow_nan=False), st.integers(1, 100))
def test_length_penalty_is_nonpositive_and_monotone(tokens, target, per_token, more):
    p = length_penalty(tokens, target, per_token)
    assert p <= 0.0
    assert length_penalty(tokens + more, target, per_token) <= p
    assert (p == 0.0) == (tokens <= target or per_token == 0.0)
