"""A trained policy without a reference model: for the reference-free objectives (SimPO, ORPO) and for GRPO with
a KL coefficient of 0, where loading a frozen copy would only cost memory and time.

(training.policy.policy_and_reference always builds the reference; this is its reference-free sibling.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def policy_without_reference(policy_spec: str, lora: Any) -> tuple[Any, Any, Any, Path]:
    """(trained module, tokenizer, peft model or None, policy path); LoRA adapters added when `lora` is set."""
    from training.loop import add_lora
    from training.policy import load_policy

    policy, tokenizer, source = load_policy(policy_spec)
    peft_model = add_lora(policy, lora, task_type="CAUSAL_LM") if lora else None
    trained = peft_model.get_base_model() if peft_model is not None else policy
    return trained, tokenizer, peft_model, source.path
