"""The attention work of a pass (service.backends.invariant.tile_layout), checked against what it must mean, for
random passes (hypothesis): every real token is the query of exactly one item; the key slots of its item hold, in
order, the rows of its input's absolute positions 0, 1, ... (its ancestors' rows, then its own), and its mask row
marks exactly the positions it may see (a decoder: up to itself; an encoder: its whole sequence), and its slots
past its input's end read a padding row. An item's shape
depends only on the tile's position (decoder) or its sequence's length (encoder): what makes its SDPA call the
same whatever else shares the pass."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.backends.invariant import ROW_TILE, TILE, tile_layout
from service.grouping import prefix_tree_layout

PROMPTS = st.lists(st.lists(st.integers(3, 9), min_size=0, max_size=150), min_size=1, max_size=3)


def paths_of(layout) -> dict[int, list[int]]:
    """For each row of the packed pass, the rows of its segment's absolute positions 0 .. its end (its
    ancestors' rows, then its own)."""
    out = {}
    for seg in layout.segments:
        path = [r for s, e in seg.context for r in range(s, e)] + list(range(seg.start, seg.end))
        out.update({r: path for r in range(seg.start, seg.end)})
    return out


def check(layout, causal: bool) -> None:
    tiles = tile_layout(layout, 0, causal, [8])
    paths = paths_of(layout)
    seen: dict[int, int] = {}
    for g in tiles.work.groups:
        q = g.q_index.view(g.tiles, g.queries)
        kv = g.kv_index.view(g.tiles, g.length)
        mask = g.mask.view(g.tiles, -1, g.length)
        real = torch.zeros(g.tiles * g.queries, dtype=torch.bool)
        real[g.src] = True
        assert torch.equal(g.dest, g.q_index[g.src])
        for j in range(g.tiles):
            for s in range(g.queries):
                if not real[j * g.queries + s]:
                    continue
                row = int(q[j, s])
                seen[row] = seen.get(row, 0) + 1
                path = paths[row]
                position = path.index(row)
                if causal:
                    assert g.queries == TILE and position // TILE == g.length // TILE - 1 and position % TILE == s
                    visible = list(range(position + 1))
                    m = mask[j, s]
                else:
                    assert g.queries == g.length == -(-len(path) // ROW_TILE) * ROW_TILE and s == position
                    visible = list(range(len(path)))
                    m = mask[j, 0]
                assert m.nonzero().squeeze(1).tolist() == visible
                assert kv[j, visible].tolist() == [path[p] for p in visible]
                # slots past its input's end read a padding row, never another input's (a NaN there would spread)
                assert not tiles.valid[kv[j, len(path):]].any()
    assert seen == {r: 1 for r in paths}


ANSWERS = st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(3, 9), min_size=1, max_size=150)),
                   min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(prompts=PROMPTS, answers=ANSWERS, min_shared=st.sampled_from([0, 1, 16, 64]))
def test_decoder_items_see_exactly_their_past(prompts, answers, min_shared):
    seqs = [prompts[p % len(prompts)] + a for p, a in answers]
    check(prefix_tree_layout(seqs, min_shared), causal=True)


@settings(max_examples=40, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(3, 9), min_size=1, max_size=200), min_size=1, max_size=8))
def test_encoder_items_see_their_whole_sequence(seqs):
    check(prefix_tree_layout(seqs, 0), causal=False)
