"""clients/ adapters for RL trainers against a live server: TRL 1.16 GRPOTrainer trains a tiny policy with a
rewardserve reward function (plain text and conversational; sync and async) and logs exactly the server's
scores; verl's compute_score / compute_score_batch and OpenRLHF's reward_func (loaded by path, as OpenRLHF does)
return the server's scores; and the adapters import with torch and transformers blocked."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from clients import RewardClient, make_async_trl_reward_func, make_trl_reward_func
from clients.trl_adapter import trl_inputs
from clients.verl_reward import ENV_URL, compute_score, compute_score_batch
from tests.helpers import LiveServer, make_tiny_llama_rm, run_with_imports_blocked, test_config
from tests.integration.test_clients import FaultyHttpProxy, ThreadedHttp

ROOT = Path(__file__).resolve().parents[2]
TEXT_PROMPTS = ["How do I boil an egg?", "What is 2 + 2?", "Name a colour.", "Say hello."]
CHAT_PROMPTS = [
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "How do I boil an egg?"}],
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Say hello."}],
]


def direct_scores(server, inputs: list[dict]) -> list[float]:
    with RewardClient(server.http_url) as client:
        return client.score(inputs)


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


# ---- TRL ----------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a reward function and keeps what TRL gave it and what it returned (TRL sees the same name)."""

    def __init__(self, inner):
        self.inner = inner
        self.__name__ = inner.__name__
        self.calls: list[tuple[list, list, list]] = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = self.inner(prompts=prompts, completions=completions, **kwargs)
        self.calls.append((list(prompts), list(completions), list(rewards)))
        return rewards


def tiny_policy(tokenizer_dir: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def train_grpo(tokenizer_dir: Path, out: Path, prompts: list, reward_funcs: list):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny_policy(tokenizer_dir)
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, max_steps=2, logging_steps=1, report_to="none",
        per_device_train_batch_size=2, num_generations=2, max_completion_length=8, save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    return trainer


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_grpo_trains_on_server_rewards_plain_text(bert_server, smollm2_tokenizer_dir, tmp_path):
    recorder = Recorder(make_trl_reward_func(bert_server.http_url, timeout=30))
    trainer = train_grpo(smollm2_tokenizer_dir, tmp_path, TEXT_PROMPTS, [recorder])

    assert trainer.state.global_step == 2
    assert len(recorder.calls) == 2  # one generation batch (1 prompt x 2 completions) per step
    means = logged(trainer, "rewards/rewardserve/mean")
    assert len(means) == 2
    for (prompts, completions, rewards), mean in zip(recorder.calls, means):
        assert all(isinstance(p, str) for p in prompts) and all(isinstance(c, str) for c in completions)
        assert set(prompts) <= set(TEXT_PROMPTS) and any(completions)  # the policy wrote something
        # what the function returned is what the server gives for the same pairs ...
        assert close(rewards, direct_scores(bert_server, [{"prompt": p, "response": c}
                                                          for p, c in zip(prompts, completions)]))
        # ... and what the trainer logged (its mean, in float32)
        assert math.isclose(mean, sum(rewards) / len(rewards), rel_tol=1e-5, abs_tol=1e-6)
    assert close(logged(trainer, "reward"), means)  # the only reward function: weight 1
    assert len(logged(trainer, "rewardserve/truncated")) == 2  # logged through TRL's log_metric


def test_grpo_trains_on_server_rewards_conversational_sync_and_async(bert_server, smollm2_tokenizer_dir, tmp_path):
    recorder = Recorder(make_trl_reward_func(bert_server.http_url, timeout=30))
    async_func = make_async_trl_reward_func(bert_server.grpc_target, transport="grpc", name="rewardserve_async")
    trainer = train_grpo(smollm2_tokenizer_dir, tmp_path, CHAT_PROMPTS, [recorder, async_func])

    assert trainer.state.global_step == 2 and len(recorder.calls) == 2
    sync_means = logged(trainer, "rewards/rewardserve/mean")
    async_means = logged(trainer, "rewards/rewardserve_async/mean")
    for (prompts, completions, rewards), sync_mean, async_mean in zip(recorder.calls, sync_means, async_means):
        assert all(isinstance(p, list) for p in prompts)
        assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in completions)
        messages = [{"messages": [*p, *c]} for p, c in zip(prompts, completions)]
        assert close(rewards, direct_scores(bert_server, messages))
        mean = sum(rewards) / len(rewards)
        assert math.isclose(sync_mean, mean, rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(async_mean, mean, rel_tol=1e-5, abs_tol=1e-6)  # gRPC, asyncio: same scores
    assert close(logged(trainer, "reward"), [2 * m for m in sync_means])  # two functions, weight 1 each


def test_trl_func_inputs_transports_and_pickling(bert_server):
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "Capital of France?"}]]
    completions = ["4", [{"role": "assistant", "content": [{"type": "text", "text": "Paris."}],
                          "tool_calls": None}]]
    inputs = trl_inputs(prompts, completions)
    assert inputs == [{"prompt": "What is 2 + 2?", "response": "4"},
                      {"messages": [{"role": "user", "content": "Capital of France?"},
                                    {"role": "assistant", "content": "Paris."}]}]
    expected = direct_scores(bert_server, inputs)

    http = make_trl_reward_func(bert_server.http_url)
    grpc_func = make_trl_reward_func(bert_server.grpc_target, transport="grpc")
    assert close(http(prompts=prompts, completions=completions, completion_ids=None), expected)
    assert close(grpc_func(prompts=prompts, completions=completions), expected)
    copy = pickle.loads(pickle.dumps(http))  # a used function pickles (without its client) and works again
    assert copy.__name__ == "rewardserve" and close(copy(prompts=prompts, completions=completions), expected)

    async_func = make_async_trl_reward_func(bert_server.http_url)

    async def twice():  # one client per event loop: a second asyncio.run gets a fresh one
        return await async_func(prompts=prompts, completions=completions)

    assert close(asyncio.run(twice()), expected) and close(asyncio.run(twice()), expected)
    http.close()
    grpc_func.close()


def test_trl_func_errors(bert_server):
    closed = make_trl_reward_func("http://127.0.0.1:1", on_error="none", max_retries=0, timeout=5)
    assert closed(prompts=["a", "b"], completions=["c", "d"]) == [None, None]  # TRL: NaN, left out
    with pytest.raises(Exception, match="max_retries|Connect|connection|refused|unavailable"):
        make_trl_reward_func("http://127.0.0.1:1", max_retries=0, timeout=5)(prompts=["a"], completions=["b"])
    with pytest.raises(ValueError, match="transport"):
        make_trl_reward_func(bert_server.http_url, transport="websocket")
    with pytest.raises(Exception, match="both be text or both be message lists"):
        make_trl_reward_func(bert_server.http_url)(prompts=["a"], completions=[[{"role": "assistant",
                                                                                  "content": "b"}]])


# ---- on_error="none": only the completions concerned get None -------------------------------------------
@pytest.fixture(scope="module")
def nan_server(tmp_path_factory, smollm2_tokenizer_dir):
    """The tiny Llama reward model with NaN embedding rows for " zebra": any input with that word makes the model
    produce NaN, and the server fails that request (500 backend_error)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = make_tiny_llama_rm(tmp_path_factory.mktemp("nan-llama"), smollm2_tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    with torch.no_grad():
        for token in tokenizer(" zebra", add_special_tokens=False).input_ids:
            model.model.embed_tokens.weight[token] = float("nan")
    model.save_pretrained(out)
    with LiveServer(test_config(out, model_name="nan-llama")) as server:
        yield server


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_lenient_nan_costs_only_the_input_that_made_it(nan_server, transport):
    """A backend failure is isolated like a refusal: the request is halved until the culprit is alone (the whole
    request got None)."""
    completions = [f"answer {i}" for i in range(8)]
    completions[5] = "a zebra"
    fine = [{"prompt": "q", "response": c} for i, c in enumerate(completions) if i != 5]
    expected = direct_scores(nan_server, fine)
    url = nan_server.grpc_target if transport == "grpc" else nan_server.http_url
    sync = make_trl_reward_func(url, transport=transport, on_error="none")(prompts=["q"] * 8, completions=completions)
    func = make_async_trl_reward_func(url, transport=transport, on_error="none")
    for rewards in (sync, asyncio.run(func(prompts=["q"] * 8, completions=completions))):
        assert rewards[5] is None and close([r for i, r in enumerate(rewards) if i != 5], expected)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_lenient_keeps_the_rewards_of_the_requests_that_succeeded(bert_server, asynchronous):
    """Sent as four requests of 4, the third fails (a 500): only its completions get None (docs/integrations.md),
    the other twelve keep their rewards (all sixteen got None)."""
    completions = [f"answer {'x' * i}" for i in range(16)]
    expected = direct_scores(bert_server, [{"prompt": "p", "response": c} for c in completions])
    proxy = FaultyHttpProxy(bert_server.http_url, [None, None, 500])
    with ThreadedHttp(proxy) as front:
        options = {"on_error": "none", "max_batch_size": 4}
        if asynchronous:  # one request at a time: the third is the third chunk
            func = make_async_trl_reward_func(front.url, max_concurrency=1, **options)
            rewards = asyncio.run(func(prompts=["p"] * 16, completions=completions))
        else:
            rewards = make_trl_reward_func(front.url, **options)(prompts=["p"] * 16, completions=completions)
    assert len(proxy.seen) == 4 and rewards[8:12] == [None] * 4
    assert close(rewards[:8] + rewards[12:], expected[:8] + expected[12:])


def test_lenient_warning_names_the_refused_input(bert_server, caplog):
    """The logged error names the refused completion's place in the call (it named its place in the half of the
    request it was sent in)."""
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    completions = [[{"role": "robot" if i == 6 else "assistant", "content": f"a{i}"}] for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="clients.trl_adapter"):
        rewards = make_trl_reward_func(bert_server.http_url, on_error="none")(prompts=prompts, completions=completions)
    assert rewards[6] is None and all(r is not None for i, r in enumerate(rewards) if i != 6)
    assert "inputs.6.messages.1.role" in caplog.text, caplog.text


FORK_AFTER_ASYNC_GRPC = """
import asyncio, multiprocessing, sys
from clients import make_async_trl_reward_func

def work(func):
    return asyncio.run(func(prompts=["What is 2 + 2?"], completions=["4"]))

if __name__ == "__main__":
    func = make_async_trl_reward_func(sys.argv[1], transport="grpc")
    first = work(func)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        print(first == pool.map_async(work, [func] * 4).get(timeout=30)[0])
"""


def test_async_grpc_func_then_fork(bert_server, tmp_path):
    """asyncio.run(func(...)) in the parent, then a fork pool calls it: the parent's grpc.aio channel is closed
    with its loop, so the children work (gRPC aborted them: "Check failed: next_worker->state == KICKED").
    In a fresh process: this one runs gRPC servers, whose threads gRPC's fork handlers must not see."""
    script = tmp_path / "fork_after_async_grpc.py"
    script.write_text(FORK_AFTER_ASYNC_GRPC)
    try:
        out = subprocess.run([sys.executable, str(script), bert_server.grpc_target], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("the forked children hung")
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


# ---- verl ---------------------------------------------------------------------------------------------
def test_verl_compute_score(bert_server, monkeypatch):
    monkeypatch.setenv(ENV_URL, bert_server.http_url)
    raw = compute_score("openai/gsm8k", "The answer is 4.", "4", extra_info={"index": 0, "split": "train"})
    assert close([raw], direct_scores(bert_server, [{"raw": "The answer is 4."}]))

    pair = compute_score("openai/gsm8k", "The answer is 4.", "4", extra_info={"prompt": "What is 2 + 2?"})
    assert close([pair], direct_scores(bert_server, [{"prompt": "What is 2 + 2?", "response": "The answer is 4."}]))

    import numpy as np  # verl hands parquet chat prompts over as numpy arrays of dicts

    chat = np.array([{"role": "user", "content": "What is 2 + 2?"}], dtype=object)
    messages = compute_score("x", "4", None, extra_info={"prompt": chat, "num_turns": None},
                             reward_router_address=None)  # verl's reward loop may add keywords: ignored
    assert close([messages], direct_scores(bert_server, [{"messages": [
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}]))

    # reward_kwargs override the environment (here: the gRPC port) and choose the prompt key
    via_grpc = compute_score("x", "The answer is 4.", None, extra_info={"question": "What is 2 + 2?"},
                             url=bert_server.grpc_target, prompt_key="question")
    assert close([via_grpc], [pair])


def test_verl_compute_score_batch(bert_server, monkeypatch):
    monkeypatch.setenv(ENV_URL, bert_server.http_url)
    solutions = ["The answer is 4.", "It is 5.", "four"]
    infos = [{"prompt": "What is 2 + 2?"}, {}, None]
    batch = compute_score_batch(data_sources=["a"] * 3, solution_strs=solutions, ground_truths=["4"] * 3,
                                extra_infos=infos)
    assert close(batch, [compute_score("a", s, "4", extra_info=i) for s, i in zip(solutions, infos)])
    assert compute_score_batch([], [], [], []) == []

    import numpy as np  # verl's batch reward manager may hand columns over as numpy arrays

    as_numpy = compute_score_batch(data_sources=np.array(["a"] * 3), solution_strs=np.array(solutions, dtype=object),
                                   ground_truths=np.array(["4"] * 3), extra_infos=np.array(infos, dtype=object))
    assert close(as_numpy, batch)
    assert compute_score_batch(np.array([]), np.array([]), np.array([]), np.array([])) == []


def test_verl_needs_a_url(monkeypatch):
    monkeypatch.delenv(ENV_URL, raising=False)
    with pytest.raises(ValueError, match=ENV_URL):
        compute_score("x", "y", None)


# ---- OpenRLHF -----------------------------------------------------------------------------------------
def load_like_openrlhf():
    """Exactly how OpenRLHF loads a `--remote_rm_url` that ends in .py."""
    spec = importlib.util.spec_from_file_location("reward_func", str(ROOT / "clients" / "openrlhf_reward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


def test_openrlhf_reward_func(bert_server, monkeypatch):
    import torch

    monkeypatch.setenv(ENV_URL, bert_server.http_url)
    monkeypatch.delenv("REWARDSERVE_INPUT", raising=False)
    reward_func = load_like_openrlhf()
    prompts = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Human: hi\nAssistant:"]
    queries = [prompts[0] + "4<|im_end|>", prompts[1] + " hello"]
    out = reward_func(queries, prompts, ["4", None])

    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert out["rewards"].dtype == torch.float32 and out["rewards"].shape == (2,)
    expected = direct_scores(bert_server, [{"raw": q} for q in queries])
    assert close(out["rewards"].tolist(), expected) and torch.equal(out["scores"], out["rewards"])
    assert out["extra_logs"]["rm_truncated"].tolist() == [0.0, 0.0]

    monkeypatch.setenv("REWARDSERVE_INPUT", "pair")
    monkeypatch.setenv("REWARDSERVE_STRIP", "<pad>")
    paired = reward_func(["<pad><pad>" + queries[1] + "<pad>"], [prompts[1]], [None])
    assert close(paired["rewards"].tolist(),
                 direct_scores(bert_server, [{"prompt": prompts[1], "response": " hello"}]))
    with pytest.raises(Exception, match="does not start with its prompt"):
        reward_func(["something else"], [prompts[1]], [None])
    # the model is named by REWARDSERVE_REWARD_MODEL (the server's own REWARDSERVE_MODEL_NAME is not read here)
    monkeypatch.setenv("REWARDSERVE_MODEL_NAME", "ignored-by-the-file")
    assert close(reward_func([queries[1]], [prompts[1]], [None])["rewards"].tolist(), paired["rewards"].tolist())
    monkeypatch.setenv("REWARDSERVE_REWARD_MODEL", "no-such-model")
    with pytest.raises(Exception, match="no-such-model"):
        reward_func([queries[1]], [prompts[1]], [None])


# ---- light: no torch, no transformers -----------------------------------------------------------------
ADAPTER_BLOCKED = {"torch", "transformers", "numpy", "trl", "verl", "openrlhf", "accelerate", "datasets", "fastapi",
                   "pydantic", "service", "uvicorn", "tokenizers"}
LIGHT_ADAPTERS = """
import os
import clients.trl_adapter, clients.verl_reward, clients.openrlhf_reward
from clients import make_trl_reward_func
os.environ["REWARDSERVE_URL"] = sys.argv[1]
trl = make_trl_reward_func(sys.argv[1])(prompts=["What is 2 + 2?"], completions=["4"])
verl = clients.verl_reward.compute_score("x", "4", None, extra_info={"prompt": "What is 2 + 2?"})
rewards, _ = clients.openrlhf_reward.score_queries(["What is 2 + 2? 4"], ["What is 2 + 2?"])
try:
    clients.openrlhf_reward.reward_func(["q"], ["p"], [None])
except ImportError as exc:
    assert "torch" in str(exc)
else:
    raise AssertionError("reward_func needs torch")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(repr([trl[0], verl, rewards[0]]))
"""


def test_adapters_import_without_torch_or_transformers(bert_server):
    out = run_with_imports_blocked(ADAPTER_BLOCKED, LIGHT_ADAPTERS, bert_server.http_url, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    trl, verl, openrlhf = eval(out.stdout.strip())  # noqa: S307 - floats we printed
    pair = direct_scores(bert_server, [{"prompt": "What is 2 + 2?", "response": "4"}])[0]
    assert close([trl, verl], [pair, pair])
    assert close([openrlhf], direct_scores(bert_server, [{"raw": "What is 2 + 2? 4"}]))
