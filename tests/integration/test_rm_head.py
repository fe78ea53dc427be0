"""Head-only RM training (`train rm --head-only`) and the overlay format it exports (rewardmodel/modeling.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardmodel.modeling import OVERLAY_META, OVERLAY_TENSORS, load_reward_model, load_tokenizer, resolve_model
from rewardmodel.rendering import encode_input
from training.data import PreferencePair

PAIRS = [
    ("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise, bake it.", "No."),
    ("What is the capital of France?", "Paris is the capital of France.", "I refuse to say."),
    ("Can you help me write a poem?", "Of course: roses bloom in quiet rows.", "Write it yourself."),
    ("Tell me a fun fact.", "Octopuses have three hearts.", "Facts are boring."),
    ("How far is the moon?", "About 384,400 km on average.", "Far."),
    ("Suggest a name for a cat.", "How about Miso?", "Cats do not need names."),
]


def _write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w") as fh:
        for prompt, good, bad in rows:
            fh.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n")


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("head")
    _write(root / "train.jsonl", PAIRS[:4])
    _write(root / "dev.jsonl", PAIRS[4:])
    out = root / "rm"
    cmd = [sys.executable, "-m", "rewardserve.cli", "train", "rm", "--base", "minilm", "--head-only", "--data",
           str(root / "train.jsonl"), "--eval", str(root / "dev.jsonl"), "--output", str(out), "--epochs", "40",
           "--lr", "1e-2", "--max-length", "48", "--no-progress", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reward head saved to" in done.stdout
    return out


def test_overlay_is_small_and_records_its_base(head_run: Path) -> None:
    meta = json.loads((head_run / OVERLAY_META).read_text())
    assert meta["base"] == "minilm" and len(meta["base_sha256"]) == 64 and meta["max_length"] == 48
    assert (head_run / OVERLAY_TENSORS).stat().st_size < 1_000_000  # pooler + classifier of MiniLM: ~0.6 MB
    assert (head_run / "reward_stats.json").exists()
    summary = json.loads((head_run / "training_config.json").read_text())
    assert summary["mode"] == "head-only" and summary["export_check_max_abs_diff"] < 1e-4
    assert 1 <= summary["best_epoch"] <= 40
    rows = [json.loads(line) for line in (head_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epoch"] == 1 and "eval/accuracy" in rows[0]


def test_overlay_loads_as_the_server_does_and_changes_only_the_head(head_run: Path) -> None:
    source = resolve_model(str(head_run))
    assert source.overlay == head_run and source.name == head_run.name and not source.untrained_head
    tok = load_tokenizer(source)
    assert tok.model_max_length == 48  # served inputs are truncated where training truncated them
    trained = load_reward_model(source, torch.float32, "cpu")
    plain = load_reward_model(resolve_model("minilm"), torch.float32, "cpu")
    t, p = trained.state_dict(), plain.state_dict()
    changed = {k for k in t if not torch.equal(t[k], p[k])}
    assert changed and changed <= {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                   "bert.pooler.dense.bias"}
    pair = PreferencePair([{"role": "user", "content": PAIRS[0][0]}], [{"role": "assistant", "content": PAIRS[0][1]}],
                          [{"role": "assistant", "content": PAIRS[0][2]}])
    ids = encode_input(tok, pair.chosen_input(), 48).input_ids
    with torch.no_grad():
        a = trained(input_ids=torch.tensor([ids])).logits[0, 0]
        b = trained(input_ids=torch.tensor([ids])).logits[0, 0]
    assert float(a) == float(b)


def test_overlay_over_other_base_weights_is_refused(head_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(head_run, bad)
    meta = json.loads((bad / OVERLAY_META).read_text())
    meta["base_sha256"] = "0" * 64
    (bad / OVERLAY_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refusing"):
        resolve_model(str(bad))


def test_overlay_with_a_foreign_tensor_is_refused(head_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "foreign"
    shutil.copytree(head_run, bad)
    save_file({"score.weight": torch.zeros(1, 7)}, str(bad / OVERLAY_TENSORS))
    with pytest.raises(ValueError, match="does not fit"):
        load_reward_model(resolve_model(str(bad)), torch.float32, "cpu")


def test_half_written_overlay_is_no_model(head_run: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    shutil.copytree(head_run, half)
    (half / OVERLAY_META).unlink()  # the metadata is written last: without it the folder is not a model
    with pytest.raises(FileNotFoundError):
        resolve_model(str(half))


def test_head_only_refuses_a_checkpoint_folder_base(tmp_path: Path) -> None:
    from training.frozen import overlay_base_spec

    with pytest.raises(ValueError, match="packaged base"):
        overlay_base_spec(str(tmp_path))


def test_l2_solve_fits_a_linear_signal_and_shrinks_with_the_penalty(tiny_llama_dir: Path) -> None:
    from training.frozen import Head
    from training.rm_head import fit_head_l2

    model = load_reward_model(resolve_model(str(tiny_llama_dir)), torch.float32, "cpu")
    head = Head(model)
    hidden = model.score.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    true_w = torch.randn(hidden, generator=gen)
    feats = torch.randn(300, 2, hidden, generator=gen) * torch.linspace(0.1, 3.0, hidden)  # uneven scales
    better = (feats[:, 0] @ true_w) > (feats[:, 1] @ true_w)
    feats[~better] = feats[~better].flip(1)  # chosen first: the true head ranks every pair right
    train, dev = feats[:200], feats[200:]
    weak = fit_head_l2(head, train, dev, l2=1e-4)
    assert weak["best_metrics"]["eval/accuracy"] > 0.85
    norm_weak = float(model.score.weight.detach().norm())
    strong = fit_head_l2(head, train, dev, l2=10.0)
    assert float(model.score.weight.detach().norm()) < norm_weak / 5
    assert strong["solver"] == "lbfgs" and strong["l2"] == 10.0
    with torch.no_grad():  # the head's rewards are exactly w.x: what the served model computes at the last token
        x = dev[:3, 0]
        assert torch.allclose(head.rewards(x), x @ model.score.weight[0], atol=1e-5)


def test_fitting_a_head_warns_of_nothing(tiny_bert_dir: Path) -> None:
    """The epoch loop logs its loss as a number without the autograd warning about float() on a grad tensor."""
    import warnings

    from training.frozen import Head
    from training.rm_head import fit_head

    head = Head(load_reward_model(resolve_model(str(tiny_bert_dir)), torch.float32, "cpu"))  # BERT pooler + classifier
    feats = torch.randn(6, 2, head.model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # (P, 2, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_head(head, feats[:4], feats[4:], epochs=3, lr=1e-2, weight_decay=0.0, patience=5, seed=0)
    assert fit["epochs_run"] == 3
