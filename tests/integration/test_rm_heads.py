"""Head-only training's feature store (dedup), bootstrap and multi-head overlays, and the length-debias fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rewardmodel.modeling import OVERLAY_META, OVERLAY_TENSORS, resolve_model
from training.data import load_preferences

ANSWERS = ["Open Settings, then Account, then Reset password.", "No idea.", "Try turning it off and on again.",
           "Ask the administrator of your account; they can reset it for you in a minute."]
PROMPTS = ["How do I reset my password?", "What is 2 + 2?", "Name a primary colour."]


def _records() -> list[dict]:
    """6 pairs per prompt from 4 ranked answers (the helpful data repeats its answers across pairs the same way)."""
    return [{"prompt": p, "chosen": a, "rejected": b} for p in PROMPTS for i, a in enumerate(ANSWERS)
            for b in ANSWERS[i + 1:]]


@pytest.fixture(scope="module")
def frozen(tiny_llama_dir: Path):
    from training.frozen import frozen_from_source

    return frozen_from_source(resolve_model(str(tiny_llama_dir)), 64)


def test_dedup_pass_gives_the_undeduplicated_features_and_computes_each_sequence_once(frozen, tmp_path) -> None:
    from training.features import FeatureStore, encode_distinct, pair_features
    from training.frozen import cache_features

    pairs = load_preferences(_records())
    rows, index = encode_distinct(frozen.collate, pairs)
    assert len(pairs) == 18 and len(rows) == 12 and index.shape == (18, 2)  # 36 inputs, 12 distinct
    want = cache_features(frozen.head, frozen.collate, pairs)  # (P, 2, H): the pass without dedup
    store = FeatureStore.open(tmp_path / "f.pt", frozen.store_key)
    got = pair_features(frozen.head, frozen.collate, pairs, store)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert len(store) == 12 and (tmp_path / "f.pt").exists()

    computed = []
    reopened = FeatureStore.open(tmp_path / "f.pt", frozen.store_key)
    again = pair_features(frozen.head, frozen.collate, pairs[:5], reopened, progress=computed.append)
    assert computed == [] and torch.equal(again, got[:5])  # everything read back from the store
    other = FeatureStore.open(tmp_path / "f.pt", {**frozen.store_key, "max_length": 32})
    assert len(other) == 0  # another max_length: the store's rows are not reused


def test_length_batches_are_sorted_and_keep_the_token_budget() -> None:
    from training.features import length_batches

    lengths = [5, 300, 40, 40, 7, 512, 100, 3]
    batches = length_batches(lengths, budget=512, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    assert all(len(b) * max(lengths[i] for i in b) <= 512 or len(b) == 1 for b in batches)
    assert all(len(b) <= 3 for b in batches)


def _synthetic(n: int = 400, hidden: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    true_w = torch.randn(hidden, generator=gen)
    feats = torch.randn(n, 2, hidden, generator=gen)
    noisy = (feats[:, 0] - feats[:, 1]) @ true_w + 2.0 * torch.randn(n, generator=gen) > 0
    feats[~noisy] = feats[~noisy].flip(1)
    return feats[: n * 3 // 4], feats[n * 3 // 4:]


def test_bootstrap_heads_differ_are_reproducible_and_resample_each_file_on_its_own() -> None:
    from training.heads import bootstrap_index, fit_heads

    idx = bootstrap_index([10, 30], seed=3)
    assert idx.shape == (40,) and bool((idx[:10] < 10).all()) and bool((idx[10:] >= 10).all())
    assert torch.equal(idx, bootstrap_index([10, 30], seed=3)) and not torch.equal(idx, bootstrap_index([10, 30], 4))
    train, dev = _synthetic()
    heads = fit_heads(train, dev, l2s=[0.01], bootstrap=4, seed=7, sizes=[100, 200])
    assert [h.name for h in heads] == ["boot0", "boot1", "boot2", "boot3"]
    assert [h.settings["bootstrap_seed"] for h in heads] == [7, 8, 9, 10]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(heads[a].weight, heads[b].weight, atol=1e-4)
    again = fit_heads(train, dev, l2s=[0.01], bootstrap=1, seed=7, sizes=[100, 200])
    assert torch.equal(again[0].weight, heads[0].weight)
    plain = fit_heads(train, dev, l2s=[0.01, 1.0])
    assert [h.name for h in plain] == ["l2_0.01", "l2_1"] and all(h.metrics["eval/accuracy"] > 0.6 for h in plain)


def test_one_se_rule_picks_the_most_regularised_head_within_one_clustered_se_of_the_best() -> None:
    from training.heads import clustered_se, fit_heads, pick_best, pick_one_se

    train, dev = _synthetic(n=800)
    groups = torch.arange(len(dev)) // 10  # 20 "prompts" of 10 pairs
    heads = fit_heads(train, dev, l2s=[0.001, 0.01, 0.1, 1.0, 100.0])
    best = pick_best(heads)
    head, se = pick_one_se(heads, dev, groups)
    assert 0 < se < 0.2
    assert head.metrics["eval/accuracy"] >= best.metrics["eval/accuracy"] - se
    assert all(h.settings["l2"] <= head.settings["l2"] for h in heads
               if h.metrics["eval/accuracy"] >= best.metrics["eval/accuracy"] - se)
    ones = torch.ones(100, dtype=torch.bool)
    assert clustered_se(ones, torch.arange(100) // 10) == 0.0
    assert clustered_se(torch.arange(100) % 2 == 0, torch.arange(100) // 10, draws=200) == pytest.approx(0.0)
    halves = torch.arange(100) < 50  # whole groups right or wrong: the SE of 10 clusters, ~0.16
    assert clustered_se(halves, torch.arange(100) // 10, draws=500) > 0.1


def test_length_fit_recovers_a_known_slope_and_removes_the_correlation() -> None:
    from training.length_debias import debias, fit_length, pearson

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 400, (500, 2), generator=gen).double()
    quality = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    quality[:, 0] += 1.0  # chosen is better
    rewards = quality + 0.02 * tokens  # a known slope of 0.02 per token
    block = fit_length(rewards, tokens, "synthetic")
    assert block["slope"] == pytest.approx(0.02, abs=1e-3)
    assert block["mean_tokens"] == pytest.approx(float(tokens.mean()))
    assert block["r_before"] > 0.8 and abs(block["r_after"]) < 1e-9
    assert block["unit"] == "response_tokens" and block["fit_on"] == "synthetic"
    after = debias(rewards, tokens, block["slope"], block["mean_tokens"])
    assert abs(pearson(after, tokens)) < 1e-9
    assert block["pair_accuracy_after"] > block["pair_accuracy_before"]  # length noise removed from the pairs


def test_response_text_is_the_final_assistant_turn_and_tokens_have_no_specials(frozen) -> None:
    from training.length_debias import pair_tokens, response_text

    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: Bye now. ",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"}
    assert response_text(hh, "chosen") == "Bye now. " and response_text(hh, "rejected") == ""
    split = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello there.", "rejected": " No."}
    assert response_text(split, "chosen") == "Hello there."
    explicit = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    assert response_text(explicit, "chosen") == "Hi!"
    conv = {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Sure thing."}],
            "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "No."}]}
    assert response_text(conv, "chosen") == "Sure thing."
    tok = frozen.tokenizer
    counts = pair_tokens(tok, [explicit, conv])
    want = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("Hi!", "No.", "Sure thing.", "No.")]
    assert counts.flatten().tolist() == want


def _run_heads(frozen, out: Path, **kw):
    from training.features import FeatureStore, pair_features
    from training.head_overlays import train_linear_heads
    from training.rm_head import finish_single
    from training.length_debias import pair_tokens

    records = _records()
    pairs = load_preferences(records)
    feats = pair_features(frozen.head, frozen.collate, pairs, FeatureStore(frozen.store_key))
    train, dev = feats[:12], feats[12:]
    stats_on = {"feats": dev, "tokens": pair_tokens(frozen.tokenizer, records[12:]), "fit_on": "dev.jsonl",
                "split": "eval"}
    common = {"mode": "head-only", "base": str(frozen.source.path), "num_hidden_layers": None, "command": "test"}
    options = {"l2s": [0.1], "bootstrap": 0, "pick_l2": False, "sizes": [6, 6], "include_heads": (), "seed": 1}
    options.update(kw)
    return train_linear_heads(frozen, out, train, dev, stats_on, common=common, check_pairs=load_preferences(
        records[12:16]), finish_single=finish_single, **options), dev


def test_single_head_keeps_todays_format_and_gains_a_length_block(frozen, tmp_path) -> None:
    summary, _ = _run_heads(frozen, tmp_path / "one", l2s=[0.01, 1.0], pick_l2="best")
    meta = json.loads((tmp_path / "one" / OVERLAY_META).read_text())
    assert "heads" not in meta and meta["max_length"] == 64
    assert load_file(str(tmp_path / "one" / OVERLAY_TENSORS))["score.weight"].shape == (1, 32)
    stats = json.loads((tmp_path / "one" / "reward_stats.json").read_text())
    assert {"mean", "std", "split", "rewards", "max_length", "length"} <= set(stats) and "heads" not in stats
    assert stats["length"]["unit"] == "response_tokens" and stats["length"]["fit_on"] == "dev.jsonl"
    assert len(summary["l2_candidates"]) == 2 and summary["export_check_max_abs_diff"] < 1e-4


def test_multi_head_writer_names_rows_and_per_head_stats(frozen, tmp_path) -> None:
    from training.overlay_io import overlay_rows

    _run_heads(frozen, tmp_path / "one", l2s=[0.1])
    summary, dev = _run_heads(frozen, tmp_path / "many", bootstrap=3, include_heads=[f"first={tmp_path / 'one'}"])
    out = tmp_path / "many"
    meta = json.loads((out / OVERLAY_META).read_text())
    assert meta["heads"] == ["first", "boot0", "boot1", "boot2"] and len(meta["base_sha256"]) == 64
    weight = load_file(str(out / OVERLAY_TENSORS))["score.weight"]
    assert weight.shape == (4, 32) and weight.dtype == torch.float32
    names, rows, _ = overlay_rows(tmp_path / "one")
    assert torch.equal(weight[0], rows[0])  # an included head is copied bit for bit
    stats = json.loads((out / "reward_stats.json").read_text())
    assert list(stats) == ["heads"] and list(stats["heads"]) == meta["heads"]
    for k, name in enumerate(meta["heads"]):
        entry = stats["heads"][name]
        r = dev @ weight[k]
        assert entry["mean"] == pytest.approx(float(r.mean()), abs=1e-6) and entry["std"] > 0
        assert entry["length"]["unit"] == "response_tokens"
    assert summary["export_check_max_abs_diff"] < 1e-4
    with pytest.raises(ValueError, match="unique"):
        _run_heads(frozen, tmp_path / "dup", bootstrap=1, include_heads=[f"boot0={tmp_path / 'one'}"])


def test_an_overlay_of_another_max_length_cannot_be_included(frozen, tmp_path) -> None:
    _run_heads(frozen, tmp_path / "one", l2s=[0.1])
    meta_path = tmp_path / "one" / OVERLAY_META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "max_length": 128}))
    with pytest.raises(ValueError, match="trained with"):
        _run_heads(frozen, tmp_path / "many", bootstrap=1, include_heads=[f"x={tmp_path / 'one'}"])


@pytest.mark.slow
def test_cli_writes_a_picked_single_head_then_a_multi_head_overlay_over_smollm2(tmp_path) -> None:
    """The whole command over the packaged base: feature store shared by both runs, --pick-l2, --bootstrap,
    --include-head, --also-data; the single-head export is reloaded the way the server loads it."""
    from rewardserve.cli import main

    records = _records()
    for name, rows in (("a", records[:8]), ("b", records[8:14]), ("dev", records[14:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store.pt"
    common = ["train", "rm", "--base", "smollm2", "--head-only", "--max-length", "96", "--threads", "1",
              "--no-progress", "--log-level", "warning", "--feature-cache", str(store),
              "--data", str(tmp_path / "a.jsonl"), "--eval", str(tmp_path / "dev.jsonl")]
    assert main([*common, "--output", str(tmp_path / "one"), "--l2", "0.1", "1", "--pick-l2"]) == 0
    summary = json.loads((tmp_path / "one" / "training_config.json").read_text())
    assert summary["export_check_max_abs_diff"] < 1e-3 and len(summary["l2_candidates"]) == 2
    assert summary["feature_store"]["sequences"] == len(torch.load(store, weights_only=True)["keys"])
    assert main([*common, "--output", str(tmp_path / "many"), "--l2", "0.3", "--bootstrap", "2",
                 "--also-data", str(tmp_path / "b.jsonl"), "--include-head", f"first={tmp_path / 'one'}"]) == 0
    meta = json.loads((tmp_path / "many" / OVERLAY_META).read_text())
    assert meta["heads"] == ["first", "boot0", "boot1"] and meta["max_length"] == 96
    assert meta["base_sha256"] == json.loads((tmp_path / "one" / OVERLAY_META).read_text())["base_sha256"]
    many = json.loads((tmp_path / "many" / "training_config.json").read_text())
    assert many["heads"][1]["resample_sizes"] == [8, 6]
    assert main([*common, "--output", str(tmp_path / "layers"), "--l2", "0.1", "1", "--pick-l2", "one-se",
                 "--read-layers", "20", "30"]) == 0
    meta = json.loads((tmp_path / "layers" / OVERLAY_META).read_text())
    assert meta["heads"] == ["L20", "L30"] and meta["head_layers"] == [20, 30] and meta["read_layers"] == [20, 30]
    assert json.loads((tmp_path / "layers" / "training_config.json").read_text())["export_check_max_abs_diff"] < 1e-3


def test_heads_report_reads_the_heads_of_several_overlays_as_members(frozen, tmp_path, capsys) -> None:
    from training.features import FeatureStore, pair_features
    from training.heads_report import main as report

    _run_heads(frozen, tmp_path / "one", l2s=[0.1])
    _run_heads(frozen, tmp_path / "two", l2s=[10.0])
    records = _records()
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in records))
    store = FeatureStore.open(tmp_path / "f.pt", frozen.store_key)
    pair_features(frozen.head, frozen.collate, load_preferences(records), store)
    store.save()
    assert report(["--overlay", str(tmp_path / "one"), str(tmp_path / "two"), "--store", str(tmp_path / "f.pt"),
                   "--sets", f"dev={dev}"]) == 0
    out = capsys.readouterr().out
    assert "| one | dev |" in out and "| two | dev |" in out  # one row per member head
    assert "| normalized | mean - 0.5 std |" in out and "AUROC" in out  # the ensemble and its uncertainty
    with pytest.raises(SystemExit):
        report(["--overlay", str(tmp_path / "one"), str(tmp_path / "one"), "--store", str(tmp_path / "f.pt"),
                "--sets", f"dev={dev}"])


def test_gate_fit_folds_standardization_into_one_row_and_cross_validates_by_prompt() -> None:
    from training.gate import balanced_accuracy, fit_logistic, grouped_folds, pick_l2

    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(300, 8, generator=gen) * 3 + torch.tensor([4.0] + [0.0] * 7) + 10  # offset, scaled features
    neg = torch.randn(100, 8, generator=gen) * 3 + 10
    x, y = torch.cat([pos, neg]), torch.cat([torch.ones(300), torch.zeros(100)])
    w, b = fit_logistic(x, y, 1e-3)
    assert w.shape == (8,) and w.dtype == torch.float64 and abs(float(w[0])) > 3 * float(w[1:].abs().max())
    z = x.double() @ w + b
    assert 0.55 < balanced_accuracy(z, y) < 0.9  # overlapping classes: right more often than not, not always
    assert abs(float((z > 0).double().mean()) - 0.75) < 0.15  # class-balanced: the intercept is not the prior's
    groups = torch.arange(400) // 4
    masks = grouped_folds(groups, 5, seed=1)
    assert sum(int(m.sum()) for m in masks) == 400
    for m in masks:  # a prompt's sequences never straddle folds
        assert set(groups[m].tolist()).isdisjoint(groups[~m].tolist())
    l2, table = pick_l2(x, y, groups, [1e-3, 1e-1, 100.0])
    assert [r["l2"] for r in table] == [1e-3, 1e-1, 100.0] and l2 != 100.0  # a huge penalty fits worst
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(pos, torch.ones(300), 1e-3)


def test_train_gate_then_a_routed_multi_head_overlay(frozen, tiny_llama_dir, tmp_path, capsys) -> None:
    """`train gate` over a tiny base: an overlay whose row and threshold separate the two files' conversations;
    `--gate` writes the ensemble block a server reads; bad --gate specs are refused before any work."""
    from rewardserve.cli import build_parser
    from training.gate import train_gate
    from training.head_overlays import parse_gate

    recs = _records()
    (tmp_path / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["prompt"] == PROMPTS[0]))
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["prompt"] != PROMPTS[0]))
    gate_dir = tmp_path / "gate"
    argv = ["train", "gate", "--positive", str(tmp_path / "pos.jsonl"), "--negative", str(tmp_path / "neg.jsonl"),
            "--output", str(gate_dir), "--max-length", "64", "--l2", "0.01", "--threads", "1"]
    from training.features import FeatureStore, encode_prompts, pair_features, sequence_key

    pairs = load_preferences(recs)
    is_pos = torch.tensor([r["prompt"] == PROMPTS[0] for r in recs])
    train_gate(build_parser().parse_args([*argv, "--reads", "input", "--output", str(tmp_path / "whole")]), frozen)
    meta = json.loads((tmp_path / "whole" / OVERLAY_META).read_text())
    row = load_file(str(tmp_path / "whole" / OVERLAY_TENSORS))["score.weight"]
    feats = pair_features(frozen.head, frozen.collate, pairs, FeatureStore(frozen.store_key))
    z = feats.flatten(0, 1) @ row[0]  # what the server reads for an input gate: raw reward vs the threshold
    assert meta["gate"]["reads"] == "input" and torch.equal(z > meta["gate"]["threshold"], is_pos.repeat_interleave(2))

    train_gate(build_parser().parse_args(argv), frozen)  # the CLI's flags (reads the prompt), over the tiny base
    with pytest.raises(ValueError, match="--base smollm2"):
        train_gate(build_parser().parse_args([*argv, "--base", str(tiny_llama_dir)]))
    meta = json.loads((gate_dir / OVERLAY_META).read_text())
    assert meta["gate"]["metrics"]["train_balanced_accuracy"] == 1.0 and "heads" not in meta
    assert meta["gate"]["reads"] == "prompt"
    threshold = meta["gate"]["threshold"]
    row = load_file(str(gate_dir / OVERLAY_TENSORS))["score.weight"]
    seqs, index = encode_prompts(frozen.collate, pairs)
    assert len(seqs) == len(PROMPTS)  # one prompt-only sequence per prompt
    store = FeatureStore(frozen.store_key)
    from training.features import fill_store

    fill_store(frozen.head, store, seqs, frozen.collate.pad_token_id)
    z = (store.lookup([sequence_key(q) for q in seqs]) @ row[0])[index]
    assert torch.equal(z > threshold, is_pos)

    spec = parse_gate("g=first", [f"g={gate_dir}", f"first={tmp_path / 'one'}"])
    assert spec == {"head": "g", "threshold": threshold, "members": ["first"], "reads": "prompt"}
    _run_heads(frozen, tmp_path / "one", l2s=[0.1])
    _run_heads(frozen, tmp_path / "many", bootstrap=2, gate=spec,
               include_heads=[f"g={gate_dir}", f"first={tmp_path / 'one'}"])
    block = json.loads((tmp_path / "many" / OVERLAY_META).read_text())["ensemble"]
    assert block == {"combine": "mean", "normalize": True, "members": ["boot0", "boot1"], "gate": spec}
    source = resolve_model(str(tmp_path / "many"))
    assert source.heads == ("g", "first", "boot0", "boot1") and source.ensemble == block

    from training.heads_report import main as report

    store = FeatureStore.open(tmp_path / "f.pt", frozen.store_key)
    pair_features(frozen.head, frozen.collate, load_preferences(recs), store)
    fill_store(frozen.head, store, seqs, frozen.collate.pad_token_id)  # the prompts the gate reads
    store.save()
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert report(["--overlay", str(tmp_path / "many"), "--store", str(tmp_path / "f.pt"),
                   "--sets", f"all={tmp_path / 'all.jsonl'}"]) == 0
    out = capsys.readouterr().out
    routed_row = next(line for line in out.splitlines() if line.startswith("| all |"))
    assert routed_row.split("|")[3].strip() == "0.333"  # the gate fires on exactly the positive prompt's inputs
    assert "| g | all |" in out and "| normalized | mean |" in out
    for bad, needle in (("g", "GATE=HEAD"), ("h=first", "--include-head h=DIR"), ("first=g", "not a gate"),
                        ("g=g", "itself")):
        with pytest.raises(ValueError, match=needle):
            parse_gate(bad, [f"g={gate_dir}", f"first={tmp_path / 'one'}"])
    with pytest.raises(ValueError, match="no head named 'nope'"):
        _run_heads(frozen, tmp_path / "bad", gate={**spec, "members": ["nope"]},
                   include_heads=[f"g={gate_dir}", f"first={tmp_path / 'one'}"])


def test_heads_per_layer_are_one_overlay_served_in_one_pass(frozen, tiny_llama_dir, tmp_path) -> None:
    """--read-layers: one feature pass holds every layer's features (the last layer's equal the plain pass's), a head
    is fit and picked per layer, the overlay says which layer each row reads, is served as their normalized mean,
    and the served forward reads each row's layer (every row checked against the training-time rewards)."""
    from training.features import FeatureStore, pair_features
    from training.frozen import frozen_from_source
    from training.overlay_io import overlay_rows
    from rewardmodel.modeling import load_reward_model, reward_forward

    layered = frozen_from_source(resolve_model(str(tiny_llama_dir)), 64, read_layers=[1, 2])
    assert layered.store_key["kind"] == "layers:1,2" and layered.store_key != frozen.store_key
    pairs = load_preferences(_records())
    both = pair_features(layered.head, layered.collate, pairs, FeatureStore(layered.store_key))  # (P, 2, 2H)
    last = pair_features(frozen.head, frozen.collate, pairs, FeatureStore(frozen.store_key))  # (P, 2, H)
    assert both.shape[-1] == 2 * last.shape[-1]
    torch.testing.assert_close(both[..., 32:], last, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[..., :32], last, atol=1e-2)  # layer 1 is another feature

    summary, dev = _run_heads(layered, tmp_path / "lay", l2s=[0.01, 1.0], pick_l2="one-se",
                              dev_groups=torch.tensor([0, 0, 1, 1, 1, 1]))
    meta = json.loads((tmp_path / "lay" / OVERLAY_META).read_text())
    assert meta["heads"] == ["L1", "L2"] and meta["head_layers"] == [1, 2]
    assert meta["ensemble"] == {"combine": "mean", "normalize": True, "members": ["L1", "L2"]}
    assert [c["layer"] for c in summary["l2_candidates"]] == [1, 1, 2, 2]
    assert summary["export_check_max_abs_diff"] < 1e-4
    names, rows, _ = overlay_rows(tmp_path / "lay")
    served = load_reward_model(resolve_model(str(tmp_path / "lay")), torch.float32, "cpu")
    batch = layered.collate(pairs[12:])
    with torch.no_grad():
        got = reward_forward(served, batch.input_ids, batch.attention_mask, heads=True)  # (2P', 2)
    flat = dev.transpose(0, 1).flatten(0, 1)  # chosen..., rejected...
    want = torch.stack([flat[:, :32] @ rows[0], flat[:, 32:] @ rows[1]], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stats = json.loads((tmp_path / "lay" / "reward_stats.json").read_text())["heads"]
    assert stats["L1"]["mean"] == pytest.approx(float((dev[..., :32] @ rows[0]).mean()), abs=1e-5)

    # a head of a layered overlay joins another overlay only where that run's features hold its layer
    summary, _ = _run_heads(layered, tmp_path / "more", bootstrap=1, include_heads=[f"L1={tmp_path / 'lay'}"])
    assert json.loads((tmp_path / "more" / OVERLAY_META).read_text())["head_layers"] == [1, 1, 2]
    with pytest.raises(ValueError, match="reads layer 1"):
        _run_heads(frozen, tmp_path / "plain", include_heads=[f"L1={tmp_path / 'lay'}"])


def test_head_only_flags_without_head_only_are_refused_not_ignored(tmp_path, capsys) -> None:
    from rewardserve.cli import main

    for extra in (["--l2", "0.3"], ["--read-layers", "8", "30"], ["--bootstrap", "2"]):
        code = main(["train", "rm", "--base", "smollm2", "--data", "x.jsonl", "--output", str(tmp_path / "o"),
                     *extra])
        assert code == 2 and f"{extra[0]} applies to --head-only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was trained


def test_train_gate_reads_every_file_before_loading_the_base(tmp_path, monkeypatch) -> None:
    """A wrong data file is refused at once, not after the minutes the base model takes to load."""
    import training.frozen
    from rewardserve.cli import build_parser
    from training.gate import train_gate

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the base was loaded before the data was read")

    monkeypatch.setattr(training.frozen, "load_frozen", no_load)
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"prompt": "p"}) + "\n")
    argv = ["train", "gate", "--positive", str(good), "--negative", str(good), "--output", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="holds prompts alone"):
        train_gate(build_parser().parse_args([*argv, "--reads", "input", "--eval-negative", str(prompts_only)]))
    with pytest.raises((OSError, ValueError), match="missing.jsonl"):
        train_gate(build_parser().parse_args([*argv, "--eval-positive", str(tmp_path / "missing.jsonl")]))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train_gate(build_parser().parse_args([*argv[:-2], "--output", str(a_file)]))
