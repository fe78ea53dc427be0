"""DynamicBatcher with prefix groups: groups form across requests, survive drops, and reach the backend."""

import asyncio
import threading

from service.batcher import DynamicBatcher


class GroupRecorder:
    """Records each batch's sequences and groups; the reward of a sequence is the sum of its ids."""

    def __init__(self):
        self.batches = []
        self.release = threading.Event()

    def __call__(self, batch):
        self.release.wait(10)
        self.batches.append(([list(s) for s in batch], getattr(batch, "groups", ())))
        return [float(sum(s)) for s in batch]


PROMPT_A = list(range(100, 140))  # 40 tokens
PROMPT_B = list(range(500, 560))  # 60 tokens


async def _held(batcher, rec, requests, cancel=()):
    """Submit while the worker is held on a first input, cancel some, release; the answers."""
    first = batcher.submit([[1]])
    await asyncio.sleep(0.05)
    submitted = [batcher.submit(req) for req in requests]
    for r, i in cancel:
        submitted[r][i].future.cancel()
    rec.release.set()
    await first[0].future
    return [await asyncio.gather(*(it.future for it in items), return_exceptions=True) for items in submitted]


async def test_groups_form_across_requests_and_reach_the_backend():
    rec = GroupRecorder()
    b = DynamicBatcher(rec, max_batch_size=64, max_wait_s=0.0, packed=True, group_min_prefix=32)
    b.start()
    try:
        requests = [[PROMPT_A + [k, j] for j in range(3)] for k in range(2)]  # one prompt over two requests
        requests.append([PROMPT_B + [j] for j in range(4)] + [[7, 8, 9]])
        answers = await _held(b, rec, requests)
        assert answers == [[float(sum(s)) for s in req] for req in requests]
        seqs, groups = rec.batches[-1]
        assert len(seqs) == 11  # one pass
        by_prefix = {g.prefix_len: sorted(tuple(seqs[m]) for m in g.members) for g in groups}
        assert by_prefix == {
            40: sorted(tuple(s) for s in requests[0] + requests[1]),
            60: sorted(tuple(s) for s in requests[2][:4]),
        }
    finally:
        b.stop()


async def test_a_dropped_member_leaves_its_group_consistent():
    rec = GroupRecorder()
    b = DynamicBatcher(rec, max_batch_size=64, max_wait_s=0.0, packed=True, group_min_prefix=32)
    b.start()
    try:
        requests = [[PROMPT_A + [j] for j in range(3)], [PROMPT_B + [1], PROMPT_B + [2]]]
        answers = await _held(b, rec, requests, cancel=[(0, 1), (1, 0)])
        assert answers[0][0] == float(sum(requests[0][0])) and answers[0][2] == float(sum(requests[0][2]))
        seqs, groups = rec.batches[-1]
        assert sorted(map(tuple, seqs)) == sorted(map(tuple, [requests[0][0], requests[0][2], requests[1][1]]))
        assert len(groups) == 1 and groups[0].prefix_len == 40  # PROMPT_B's group lost a member: no group
        assert sorted(tuple(seqs[m]) for m in groups[0].members) == sorted(map(tuple, [requests[0][0], requests[0][2]]))
    finally:
        b.stop()


async def test_padded_batchers_never_group():
    rec = GroupRecorder()
    b = DynamicBatcher(rec, max_batch_size=64, max_wait_s=0.0, packed=False, group_min_prefix=32)
    assert b.group_min_prefix == 0
    b.start()
    try:
        await _held(b, rec, [[PROMPT_A + [j] for j in range(3)]])
        assert all(groups == () for _, groups in rec.batches)
    finally:
        b.stop()
