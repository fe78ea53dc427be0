"""The file forms of the verl and OpenRLHF adapters survive Ray's pickling (issue #12.4).

verl (`verl.utils.import_utils.load_module`, used by `verl.trainer.ppo.reward.get_custom_reward_fn`) loads
`custom_reward_function.path` under a made-up module name that is not put in sys.modules, wraps the function in
`functools.partial(_call_with_kwargs, raw_fn, reward_kwargs)` and hands that to Ray, which pickles it with
cloudpickle: by value, module globals included. OpenRLHF loads `--remote_rm_url <file>.py` the same way (module
"reward_func") and some versions wrap `reward_func` in `ray.remote`. Here each is loaded that way, pickled with
cloudpickle, and called in a fresh process (whose working directory holds a `clients.py` that must not be
imported) against a live server.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients import RewardClient

cloudpickle = pytest.importorskip("cloudpickle", reason="cloudpickle (the [dev] extra) pickles as Ray does")

ROOT = Path(__file__).resolve().parents[2]
SHADOW = "raise ImportError('the top-level clients (here: the user\\'s clients.py) was imported')\n"
WORKER = """
import json, sys
import cloudpickle
blob = open(sys.argv[1], "rb").read()
calls = json.loads(sys.argv[2])
fns = [cloudpickle.loads(blob) for _ in calls]  # Ray unpickles an argument at every task
out = [fn(*args, **kwargs) for fn, (args, kwargs) in zip(fns, calls)]
out = [o if isinstance(o, (float, list)) else {k: v.tolist() for k, v in o.items() if k != "extra_logs"} for o in out]
from rewardserve.clients import adapter_clients
assert "clients" not in sys.modules, "the top-level name clients was imported"
print(json.dumps({"out": out, "clients": len(adapter_clients._clients)}))
"""


def load_by_path(path: Path, name: str):
    """How verl (`load_module`, name `custom_module_<hash>`) and OpenRLHF (name "reward_func") load a file."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert name not in sys.modules  # so cloudpickle must pickle its functions by value
    return module


def verl_partial(raw_fn, reward_kwargs: dict):
    """verl's `get_custom_reward_fn` result: reward_kwargs take precedence over the call's keywords."""

    def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
        return raw_fn(*args, **{**kwargs, **extra_kwargs})

    return functools.partial(_call_with_kwargs, raw_fn, reward_kwargs)


def run_in_fresh_process(blob: bytes, calls: list, tmp_path: Path, env: dict | None = None) -> dict:
    (tmp_path / "clients.py").write_text(SHADOW)  # a user's module named like ours, in the worker's directory
    (tmp_path / "fn.pkl").write_bytes(blob)
    out = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "fn.pkl"), json.dumps(calls)],
                         cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def scores(server, inputs: list[dict]) -> list[float]:
    with RewardClient(server.http_url) as client:
        return client.score(inputs)


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b))


def test_verl_file_form_pickles_and_scores_in_a_fresh_process(bert_server, tmp_path):
    path = ROOT / "clients" / "verl_reward.py"
    module = load_by_path(path, f"custom_module_{hash(os.path.abspath(path))}")
    one = verl_partial(module.compute_score, {"url": bert_server.http_url})
    blob = cloudpickle.dumps(one)
    sample = {"data_source": "gsm8k", "solution_str": "The answer is 4.", "ground_truth": "4",
              "extra_info": {"prompt": "What is 2 + 2?"}}
    result = run_in_fresh_process(blob, [[[], sample], [[], sample]], tmp_path)

    expected = scores(bert_server, [{"prompt": "What is 2 + 2?", "response": "The answer is 4."}])[0]
    assert close(result["out"], [expected, expected])
    assert result["clients"] == 1  # two unpickled copies, one client for the process and configuration

    batch = verl_partial(module.compute_score_batch, {"url": bert_server.grpc_target})
    many = {"data_sources": ["a", "b"], "solution_strs": ["The answer is 4.", "five"], "ground_truths": [1, 2],
            "extra_infos": [{"prompt": "What is 2 + 2?"}, None]}
    result = run_in_fresh_process(cloudpickle.dumps(batch), [[[], many]], tmp_path)
    assert close(result["out"][0], [expected, scores(bert_server, [{"raw": "five"}])[0]])


def test_openrlhf_file_form_pickles_and_scores_in_a_fresh_process(bert_server, tmp_path):
    module = load_by_path(ROOT / "clients" / "openrlhf_reward.py", "reward_func")
    blob = cloudpickle.dumps(module.reward_func)  # what ray.remote(reward_module.reward_func) ships
    queries, prompts = ["Human: hi Assistant: hello"], ["Human: hi Assistant:"]
    result = run_in_fresh_process(blob, [[[queries, prompts, [None]], {}]], tmp_path,
                                  env={"REWARDSERVE_URL": bert_server.http_url})
    out = result["out"][0]
    assert close(out["rewards"], scores(bert_server, [{"raw": queries[0]}])) and out["scores"] == out["rewards"]
