"""Shared-prefix planning (service/grouping.py): which inputs form groups, and how groups are cut into passes."""

import random
from dataclasses import dataclass

import pytest

from service.grouping import (
    BatchResult,
    Group,
    PlannedBatch,
    common_prefix_len,
    find_groups,
    plan_grouped_batches,
    prefix_tree_layout,
    restrict,
)


@dataclass(eq=False)
class Item:
    ids: list

    @property
    def length(self):
        return len(self.ids)


def _seq(rng, n):
    return [rng.randrange(10, 1000) for _ in range(n)]


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_len([1, 2, 3], [1, 2]) == 2
    assert common_prefix_len([1, 2, 3], [1, 9, 3]) == 1
    assert common_prefix_len([5], [6]) == 0
    assert common_prefix_len([], [1]) == 0
    rng = random.Random(0)
    for _ in range(200):
        a = _seq(rng, rng.randint(0, 40))
        b = a[: rng.randint(0, len(a))] + _seq(rng, rng.randint(0, 5))
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_len(a, b) == expected


def test_groups_by_prompt_across_shuffled_inputs():
    rng = random.Random(1)
    p1, p2 = _seq(rng, 50), _seq(rng, 70)
    seqs = [p1 + _seq(rng, 5) for _ in range(4)] + [p2 + _seq(rng, 9) for _ in range(3)] + [_seq(rng, 60)]
    order = list(range(len(seqs)))
    rng.shuffle(order)
    shuffled = [seqs[i] for i in order]
    parts = find_groups(shuffled, min_prefix=16)
    by_members = {frozenset(order[i] for i in members): prefix for prefix, members in parts}
    assert by_members == {frozenset({0, 1, 2, 3}): 50, frozenset({4, 5, 6}): 70, frozenset({7}): 0}
    assert sorted(i for _, members in parts for i in members) == list(range(len(seqs)))


def test_min_prefix_and_what_counts_as_shared():
    rng = random.Random(2)
    short = _seq(rng, 10)
    assert all(p == 0 for p, _ in find_groups([short + [1], short + [2]], min_prefix=16))
    assert find_groups([short + [1], short + [2]], min_prefix=10) == [(10, [0, 1])]
    assert find_groups([short + [1], short + [2]], min_prefix=0) == [(0, [0]), (0, [1])]
    # identical inputs, and one input that is a prefix of the others: the shortest is the prefix
    prompt = _seq(rng, 40)
    parts = find_groups([prompt + [5, 6], prompt, prompt + [5, 6], prompt + [5]], min_prefix=16)
    assert parts == [(40, [0, 1, 2, 3])]


def test_longer_per_prompt_prefixes_beat_one_short_shared_header():
    """A system-prompt header shared by everything vs two prompts: grouping by prompt computes more once."""
    rng = random.Random(3)
    header = _seq(rng, 20)
    a, b = header + _seq(rng, 100), header + _seq(rng, 100)
    seqs = [a + _seq(rng, 8) for _ in range(3)] + [b + _seq(rng, 8) for _ in range(3)]
    parts = find_groups(seqs, min_prefix=16)
    assert sorted((p, sorted(m)) for p, m in parts) == [(120, [0, 1, 2]), (120, [3, 4, 5])]
    # many short answers to different prompts under one long header: one group at the header
    seqs = [header + _seq(rng, 3) for _ in range(5)]
    assert find_groups(seqs, min_prefix=16) == [(20, [0, 1, 2, 3, 4])]


def _check_plan(items, batches, max_count, max_tokens):
    flat = [it for batch, _ in batches for it in batch]
    assert sorted(map(id, flat)) == sorted(map(id, items))  # every item once
    for batch, groups in batches:
        grouped = [m for g in groups for m in g.members]
        assert len(grouped) == len(set(grouped))
        saved = 0
        for g in groups:
            assert len(g.members) >= 2
            first = batch[g.members[0]].ids[: g.prefix_len]
            assert all(batch[m].ids[: g.prefix_len] == first for m in g.members)
            saved += (len(g.members) - 1) * g.prefix_len
        assert len(batch) <= max_count
        assert len(batch) == 1 or sum(it.length for it in batch) - saved <= max_tokens


@pytest.mark.parametrize("seed", range(5))
def test_plan_keeps_every_item_once_and_respects_limits(seed):
    rng = random.Random(seed)
    prompts = [_seq(rng, rng.randint(16, 200)) for _ in range(4)]
    items = [Item(rng.choice(prompts) + _seq(rng, rng.randint(0, 60))) for _ in range(40)]
    items += [Item(_seq(rng, rng.randint(1, 300))) for _ in range(10)]
    rng.shuffle(items)
    batches = plan_grouped_batches(items, max_batch_size=8, max_batch_tokens=600, min_prefix=16)
    _check_plan(items, batches, 8, 600)
    assert any(groups for _, groups in batches)


def test_big_group_is_split_into_chunks_that_each_carry_the_prefix():
    rng = random.Random(7)
    prompt = _seq(rng, 100)
    items = [Item(prompt + _seq(rng, 20)) for _ in range(10)]
    batches = plan_grouped_batches(items, max_batch_size=4, max_batch_tokens=10_000, min_prefix=16)
    assert [len(b) for b, _ in batches] == [2, 4, 4]  # cheapest pass first
    assert all(groups == (Group(100, tuple(range(len(b)))),) for b, groups in batches)
    batches = plan_grouped_batches(items, max_batch_size=32, max_batch_tokens=100 + 3 * 20, min_prefix=16)
    _check_plan(items, batches, 32, 160)
    assert sorted(len(b) for b, _ in batches) == [1, 3, 3, 3]  # a lone leftover is scored plainly
    assert [g for b, g in batches if len(b) == 1] == [()]


def test_without_groups_the_plan_is_the_packed_plan():
    from service.batcher import plan_batches

    rng = random.Random(8)
    items = [Item(_seq(rng, rng.randint(1, 300))) for _ in range(30)]
    grouped = plan_grouped_batches(items, 8, 900, min_prefix=16)
    plain = plan_batches(items, 8, 900, 0.0, packed=True)
    assert [[id(i) for i in b] for b, _ in grouped] == [[id(i) for i in b] for b in plain]
    assert all(groups == () for _, groups in grouped)


def test_restrict_after_drops_and_planned_batch():
    groups = (Group(10, (0, 1, 2)), Group(5, (3, 4)))
    assert restrict(groups, [0, 2, 3]) == (Group(10, (0, 1)),)
    assert restrict(groups, [1, 2, 3, 4]) == (Group(10, (0, 1)), Group(5, (2, 3)))
    batch = PlannedBatch([[1] * 12, [1] * 11, [1] * 10, [2] * 5, [2] * 6], groups)
    assert batch == [[1] * 12, [1] * 11, [1] * 10, [2] * 5, [2] * 6] and len(batch) == 5
    assert batch.saved_tokens == 2 * 10 + 5
    assert PlannedBatch([[1]]).groups == ()


def _rebuild(layout, i):
    """Input i as the layout computes it: its segment's context ranges, then its segment up to its read index."""
    seg = next(s for s in layout.segments if s.start <= layout.read[i] < s.end)
    rows = [r for a, b in seg.context for r in range(a, b)] + list(range(seg.start, layout.read[i] + 1))
    return [layout.ids[r] for r in rows], [layout.positions[r] for r in rows]


@pytest.mark.parametrize("seed", range(40))
def test_prefix_tree_layout_computes_every_input_exactly(seed):
    """Random nested families (header -> prompts -> answers, duplicates, inputs that are prefixes of others):
    every input is rebuilt from its ancestors' segments with positions 0..n-1, and the saving is exact."""
    rng = random.Random(seed)
    header = [rng.randrange(3) for _ in range(rng.randint(0, 30))]
    seqs = []
    for _ in range(rng.randint(1, 5)):
        prompt = header + [rng.randrange(4) for _ in range(rng.randint(0, 25))]
        for _ in range(rng.randint(1, 4)):
            seq = prompt + [rng.randrange(4) for _ in range(rng.randint(0, 8))]
            seqs.extend([seq] * rng.choice((1, 1, 2)) if seq else [])
    rng.shuffle(seqs)
    for min_shared in (0, 1, 4, 16):
        layout = prefix_tree_layout(seqs, min_shared)
        for i, seq in enumerate(seqs):
            assert _rebuild(layout, i) == (seq, list(range(len(seq))))
        assert layout.saved == sum(map(len, seqs)) - len(layout.ids) >= 0
        assert [s.start for s in layout.segments] == sorted(s.start for s in layout.segments)
        if min_shared == 0:
            assert layout.saved == 0 and len(layout.segments) == len(seqs)


def test_prefix_tree_layout_levels_and_threshold():
    header, p1, p2 = [7] * 24, [1] * 50, [2] * 40
    seqs = [header + p1 + [3], header + p1 + [4, 4], header + p2 + [5], header + p2 + [6, 6, 6]]
    nested = prefix_tree_layout(seqs, min_shared=16)
    assert nested.saved == 3 * 24 + 50 + 40 and nested.shared_inputs == 4
    assert len(nested.segments) == 1 + 2 + 4  # header, two prompts, four answers
    assert prefix_tree_layout(seqs, min_shared=32).saved == 50 + 24 + 40 + 24  # the header is copied per prompt
    assert prefix_tree_layout([[1, 2, 3], [1, 2, 3]], min_shared=16).saved == 3  # duplicates: always once
    assert prefix_tree_layout([[1, 2, 3], [1, 2, 4]], min_shared=16).saved == 0
    with pytest.raises(ValueError):
        prefix_tree_layout([[1], []], 4)


def test_a_backend_that_shares_its_own_way_reports_its_saving():
    """A backend (e.g. vLLM's prefix cache) that shares in its own way says what it saved in its BatchResult;
    the batcher reports that, not the radix tree's saving."""
    import asyncio

    from service.batcher import DynamicBatcher

    batch = PlannedBatch([[1] * 40 + [2], [1] * 40 + [3], [4] * 5], (Group(40, (0, 1)),), 16)
    assert batch.saved_tokens == 40 and batch.shared_inputs == 2  # the radix tree's saving
    seen = []

    class Observer:
        def on_groups(self, inputs, saved):
            seen.append((inputs, saved))

        def __getattr__(self, name):
            return lambda *args: None

    def compute(planned):  # e.g. vLLM: two members read 32 cached tokens, the priming pass paid 40
        return BatchResult([0.0] * len(planned), saved_tokens=2 * 32 - 40, shared_inputs=2)

    async def run():
        batcher = DynamicBatcher(compute, packed=True, group_min_prefix=16, observer=Observer(), max_wait_s=0.05)
        batcher.start()
        items = batcher.submit([[1] * 40 + [2], [1] * 40 + [3]])
        await asyncio.gather(*(item.future for item in items))
        batcher.stop()

    asyncio.run(run())
    assert seen == [(2, 24)]

