"""training/sampler.py: the length-grouped data order, and the training loop resuming it exactly mid-epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt
from training.data import PreferenceCollator, PreferencePair
from training.loop import TrainConfig, train
from training.sampler import item_lengths, lengths_digest, micro_batches

torch.set_num_threads(1)


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts spread like chat data: many short, a long tail (lognormal, 8..512)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(4.8, 0.8, n), 8, 512).astype(int).tolist()


def padded_cost(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


# ------------------------------------------------------------------------------------------------ the order


@pytest.mark.parametrize("n, batch_size", [(1000, 8), (997, 8), (40, 3), (5, 8)])
def test_every_item_exactly_once_per_epoch_and_as_many_batches_as_the_random_order(n, batch_size):
    lengths = skewed_lengths(n)
    for epoch in range(3):
        grouped = micro_batches(n, batch_size, epoch, seed=11, lengths=lengths)
        assert sorted(i for b in grouped for i in b) == list(range(n))
        assert len(grouped) == len(micro_batches(n, batch_size, epoch, seed=11))  # steps_per_epoch is unchanged
        assert sum(len(b) < batch_size for b in grouped) == (1 if n % batch_size else 0)  # at most one short batch


def test_the_order_is_a_function_of_seed_and_epoch_only():
    lengths = skewed_lengths(800)
    first = micro_batches(800, 8, 0, seed=11, lengths=lengths)
    assert micro_batches(800, 8, 0, seed=11, lengths=list(lengths)) == first
    assert micro_batches(800, 8, 1, seed=11, lengths=lengths) != first  # reshuffled every epoch
    assert micro_batches(800, 8, 0, seed=12, lengths=lengths) != first


def test_grouping_cuts_padding_and_still_shuffles():
    n, batch_size = 2000, 8
    lengths = skewed_lengths(n)
    grouped = micro_batches(n, batch_size, 0, seed=3, lengths=lengths)
    random_order = micro_batches(n, batch_size, 0, seed=3)
    real = sum(lengths)
    assert real / padded_cost(grouped, lengths) > 0.9  # measured 0.97
    assert real / padded_cost(random_order, lengths) < 0.6  # measured 0.43
    # each batch holds items of similar length...
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped]
    assert np.median(spread) < 10
    # ...but the epoch does not run long-to-short: batch maxima are not sorted, and consecutive batches differ
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True)
    assert abs(np.corrcoef(maxima[1:-1], maxima[2:])[0, 1]) < 0.3  # no run of similar lengths (measured 0.10)


def test_the_longest_item_comes_first():
    lengths = skewed_lengths(600, seed=5)
    for epoch in range(3):
        first = micro_batches(600, 8, epoch, seed=1, lengths=lengths)[0]
        assert max(lengths[i] for i in first) == max(lengths)


def test_processes_share_each_global_batch_and_get_similar_lengths():
    n, batch_size, world = 400, 4, 2
    lengths = skewed_lengths(n, seed=2)
    ranks = [micro_batches(n, batch_size, 0, seed=9, world=world, rank=r, lengths=lengths) for r in range(world)]
    single = micro_batches(n, batch_size * world, 0, seed=9, lengths=lengths)
    # step for step, the processes together hold exactly the batch one process with world x batch_size would
    assert [sorted(b0 + b1) for b0, b1 in zip(*ranks)] == [sorted(b) for b in single]
    assert all(len(b) == batch_size for r in ranks for b in r)
    # rank r takes every world-th item of a length-sorted global batch: both ranks pad to about the same length
    gaps = [abs(max(lengths[i] for i in b0) - max(lengths[i] for i in b1)) for b0, b1 in zip(*ranks)]
    assert np.median(gaps) <= 2


def test_several_processes_drop_the_permutations_tail_as_the_random_order_does():
    n, batch_size, world = 403, 4, 2
    lengths = skewed_lengths(n, seed=2)
    for grouped in (lengths, None):
        ranks = [micro_batches(n, batch_size, 0, seed=9, world=world, rank=r, lengths=grouped) for r in range(world)]
        assert len(ranks[0]) == len(ranks[1]) == n // (batch_size * world)  # DDP: every process steps together
        seen = [i for r in ranks for b in r for i in b]
        assert len(seen) == len(set(seen)) == 400
        tail = np.random.default_rng([9, 0]).permutation(n)[400:].tolist()
        assert set(range(n)) - set(seen) == set(tail)


def test_lengths_must_match_the_items():
    with pytest.raises(ValueError, match="lengths"):
        micro_batches(10, 2, 0, seed=0, lengths=[1, 2, 3])


def test_item_lengths_uses_the_collators_lengths_and_the_digest_tracks_them():
    class Measured:
        def lengths(self, items):
            return [len(x) for x in items]

    assert item_lengths(lambda items: items, ["ab", "c"]) is None  # a plain function: random order
    assert item_lengths(Measured(), ["ab", "c"]) == [2, 1]
    assert lengths_digest(None) == ""
    assert lengths_digest([2, 1]) == lengths_digest([2, 1]) != lengths_digest([1, 2])


# ---------------------------------------------------------------------------------- the collator's lengths


def test_preference_collator_lengths_keep_ids_that_batch_exactly_like_fresh_encoding(tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    pairs = [PreferencePair([{"role": "user", "content": " ".join(words[: 1 + i % 9])}],
                            [{"role": "assistant", "content": "yes " * (1 + 7 * i % 23)}],
                            [{"role": "assistant", "content": "no " * (1 + 3 * i % 17)}]) for i in range(12)]
    kept = PreferenceCollator(tokenizer, max_length=24)
    lengths = kept.lengths(pairs)
    fresh = PreferenceCollator(tokenizer, max_length=24)
    assert lengths == [max(len(c.input_ids), len(r.input_ids)) for c, r in map(fresh.encode, pairs)]
    assert max(lengths) == 24  # some were truncated to max_length
    for idx in ([0, 5, 7], [11, 2], list(range(12))):
        a, b = kept([pairs[i] for i in idx]), fresh([pairs[i] for i in idx])
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.truncated, b.truncated) and a.truncated.any()
    # a different pair object with equal content is encoded afresh, not mistaken for a kept one
    other = PreferencePair(pairs[0].prompt_messages, pairs[1].chosen, pairs[0].rejected)
    assert torch.equal(kept([other]).input_ids, fresh([other]).input_ids)


# --------------------------------------------------------------------------------- exact resume, mid-epoch


class Item:
    def __init__(self, index: int, x: torch.Tensor, y: torch.Tensor, length: int):
        self.index, self.x, self.y, self.length = index, x, y, length


class Toy(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B,)


class LengthCollate:
    """Stacks toy items; offers lengths() so the loop groups by length."""

    def lengths(self, items: list[Item]) -> list[int]:
        return [item.length for item in items]

    def __call__(self, items: list[Item]) -> dict:
        return {"x": torch.stack([i.x for i in items]), "y": torch.stack([i.y for i in items]),  # (B, 4), (B,)
                "index": [i.index for i in items]}


def toy_items(n: int = 60) -> list[Item]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=g)  # (N, 4)
    y = x @ torch.tensor([1.0, -1.0, 0.5, 2.0])  # (N,)
    return [Item(i, x[i], y[i], n_tok) for i, n_tok in enumerate(skewed_lengths(n, seed=8))]


def recording_step(seen: list, die_at: int | None = None):
    def step(model, batch):
        if model.training:
            if die_at is not None and len(seen) == die_at:
                raise KeyboardInterrupt("simulated kill")
            seen.append(batch["index"])
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {}

    return step


def loop_config(tmp_path, name: str, **overrides) -> TrainConfig:
    base = {"output_dir": str(tmp_path / name), "lr": 5e-3, "batch_size": 4, "max_steps": 22, "save_every": 4,
            "log_every": 1, "keep_checkpoints": 0, "progress": False, "seed": 3}
    return TrainConfig(**(base | overrides))


def test_a_length_grouped_run_killed_mid_epoch_resumes_exactly(tmp_path):
    items, collate = toy_items(), LengthCollate()  # 60 items / 4 = 15 steps per epoch: step 22 is in epoch 2
    straight_seen: list = []
    straight = train(loop_config(tmp_path, "straight"), Toy(0), items, collate, recording_step(straight_seen))
    lengths = collate.lengths(items)
    assert straight_seen[:15] == micro_batches(60, 4, 0, 3, lengths=lengths)  # the loop used the grouped order
    assert straight_seen[15:] == micro_batches(60, 4, 1, 3, lengths=lengths)[:7]

    killed_seen: list = []
    with pytest.raises(KeyboardInterrupt):  # dies in step 19 (epoch 1, its 4th step); last checkpoint: step 16
        train(loop_config(tmp_path, "killed"), Toy(0), items, collate, recording_step(killed_seen, die_at=18))
    assert killed_seen == straight_seen[:18]
    assert ckpt.find_latest(tmp_path / "killed" / "checkpoints").name == "step-00000016"  # mid-epoch 1
    resumed_seen: list = []
    resumed = train(loop_config(tmp_path, "killed", resume=True), Toy(1), items, collate, recording_step(resumed_seen))
    assert resumed_seen == straight_seen[16:]  # the very same micro-batches, in order, from the checkpoint on
    assert resumed.state.step == 22 and (resumed.state.epoch, resumed.state.step_in_epoch) == (1, 7)
    want = torch.cat([p.detach().flatten() for p in straight.model.parameters()])
    got = torch.cat([p.detach().flatten() for p in resumed.model.parameters()])
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_resume_refuses_a_different_data_order(tmp_path):
    items, collate = toy_items(), LengthCollate()
    train(loop_config(tmp_path, "run", max_steps=5), Toy(0), items, collate, recording_step([]))
    with pytest.raises(ValueError, match="data order"):
        train(loop_config(tmp_path, "run", max_steps=8, resume=True, group_by_length=False), Toy(0), items, collate,
              recording_step([]))
    shorter = [Item(i.index, i.x, i.y, max(1, i.length // 2)) for i in items]  # e.g. a smaller max_length
    with pytest.raises(ValueError, match="data order"):
        train(loop_config(tmp_path, "run", max_steps=8, resume=True), Toy(0), shorter, collate, recording_step([]))
