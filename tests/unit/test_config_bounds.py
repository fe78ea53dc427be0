"""Every numeric field of the config has its valid range: a value outside is refused with a message naming the
field, and any accepted batching setting gives a batcher that answers (`max_batch_size=0` made it take 0 items
forever)."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.batcher import DynamicBatcher
from service.config import ServeConfig

NUMERIC = {name: field for name, field in ServeConfig.model_fields.items() if field.annotation in (int, float)}
NUMBERS = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 0.5, 2**31, float("nan"), float("inf")]),
)


def bounds(field) -> tuple[float, float, bool, bool]:
    lo, hi, lo_open, hi_open = -math.inf, math.inf, False, False
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo, lo_open = m.gt, True
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi, hi_open = m.lt, True
    return lo, hi, lo_open, hi_open


def test_every_numeric_field_has_a_range():
    for name, field in NUMERIC.items():
        lo, hi, _, _ = bounds(field)
        assert lo > -math.inf, f"{name} has no lower bound"


@pytest.mark.parametrize("name", sorted(NUMERIC))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=NUMBERS)
def test_values_outside_the_range_are_refused_naming_the_field(name, value):
    field = NUMERIC[name]
    lo, hi, lo_open, hi_open = bounds(field)
    try:
        config = ServeConfig(**{name: value})
    except ValidationError as exc:
        assert name in str(exc)
        return
    accepted = getattr(config, name)
    assert math.isfinite(accepted)
    assert (accepted > lo if lo_open else accepted >= lo) and (accepted < hi if hi_open else accepted <= hi)
    if field.annotation is int:
        assert accepted == int(accepted)


@settings(max_examples=30, deadline=None)
@given(size=NUMBERS, tokens=NUMBERS, wait=NUMBERS, padding=NUMBERS, queue=NUMBERS)
def test_any_accepted_batching_config_answers(size, tokens, wait, padding, queue):
    try:
        c = ServeConfig(max_batch_size=size, max_batch_tokens=tokens, max_wait_ms=min(wait, 50) if
                        isinstance(wait, (int, float)) and wait == wait else wait, max_padding_ratio=padding,
                        max_queue=queue)
    except ValidationError:
        return
    batcher = DynamicBatcher(lambda batch: [0.0] * len(batch), max_batch_size=c.max_batch_size,
                             max_batch_tokens=c.max_batch_tokens, max_wait_s=c.max_wait_ms / 1000,
                             max_padding_ratio=c.max_padding_ratio, max_queue=c.max_queue)

    async def run() -> list:
        batcher.start()
        try:
            items = batcher.submit([[1, 2, 3]] * min(3, c.max_queue))
            return await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 10)
        finally:
            batcher.stop()

    assert asyncio.run(run()) == [0.0] * min(3, c.max_queue)


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CUDA", "cpu:0", ""])
def test_a_device_that_is_not_one_of_the_forms_is_refused_by_name(device):
    with pytest.raises(ValidationError, match=f"device {device!r} is not one of auto, cpu, cuda, cuda:N"):
        ServeConfig(model="default", device=device)
    assert [ServeConfig(model="default", device=d).device for d in ("auto", "cpu", "cuda", "cuda:1")]


def test_cuda_asked_for_where_there_is_none_is_a_one_line_error():
    import torch

    from service.backends.hf_backend import pick_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device 'cuda:{count}': this machine has"):
        pick_device(f"cuda:{count}")
    assert pick_device("cpu") == "cpu"
