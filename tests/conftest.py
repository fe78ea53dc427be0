import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.helpers import (  # noqa: E402
    LiveServer, make_tiny_bert_rm, make_tiny_llama_lm, make_tiny_llama_rm, save_smollm2_tokenizer, test_config,
)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert_rm(tmp_path_factory.mktemp("tiny-bert-rm"))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return make_tiny_llama_rm(tmp_path_factory.mktemp("tiny-llama-rm"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_lm_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny causal LM (policy) with the SmolLM2 tokenizer and chat template."""
    return make_tiny_llama_lm(tmp_path_factory.mktemp("tiny-llama-lm"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny causal LM (policy) that vLLM's CPU attention also runs (head_dim 32): Best-of-N generators."""
    return make_tiny_llama_lm(tmp_path_factory.mktemp("tiny-policy"), smollm2_tokenizer_dir, hidden_size=64, heads=2)


@pytest.fixture(scope="module")
def bert_server(tiny_bert_dir):
    """A live server (HTTP + gRPC) on the tiny BERT reward model, shared by a test module."""
    with LiveServer(test_config(tiny_bert_dir, model_name="tiny-bert")) as server:
        yield server


@pytest.fixture(scope="module")
def llama_server(tiny_llama_dir):
    with LiveServer(test_config(tiny_llama_dir, model_name="tiny-llama")) as server:
        yield server
