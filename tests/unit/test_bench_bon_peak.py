"""bench/bon.py's forward_vs_peak parts: FLOP per token from a checkpoint's config, the matmul peak, vLLM's dtype."""

import argparse

import torch

from bench.bon import flop_per_token, matmul_peak, vllm_dtype


def test_flop_per_token_counts_every_linear_layer(tiny_llama_dir):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_llama_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = (c.hidden_size * c.num_attention_heads * head_dim * 2 + c.hidden_size * kv * 2
                 + 3 * c.hidden_size * c.intermediate_size)
    assert flop_per_token(tiny_llama_dir) == 2.0 * (c.num_hidden_layers * per_layer + c.hidden_size * c.num_labels)


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak("float32", torch.get_num_threads(), 0.05) > 0.1  # GFLOP/s


def test_vllm_dtype_follows_the_hardware_unless_named():
    from service.backends.precision import native_bf16

    assert vllm_dtype(argparse.Namespace(vllm_dtype="float32")) == "float32"
    assert vllm_dtype(argparse.Namespace(vllm_dtype="auto")) == ("bfloat16" if native_bf16("cpu") else "float32")
