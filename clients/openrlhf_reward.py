"""A rewardserve server as an OpenRLHF custom reward file: `--remote_rm_url /path/to/clients/openrlhf_reward.py`.
See docs/integrations.md.

OpenRLHF loads a `--remote_rm_url` ending in `.py` with `importlib.util.spec_from_file_location("reward_func",
path)` and calls its `reward_func(queries, prompts, labels)` (openrlhf/trainer/ray/vllm_engine executors and the
older `RemoteExperienceMaker`), in batches of `micro_rollout_batch_size` (newer versions: one sample at a time,
in a thread). `queries` are the full sequences (prompt + response, decoded with special tokens: the policy's
chat template is already applied), `prompts` the prompts alone, `labels` the `--label_key` column. It returns a
dict: "rewards" (tensor, used for the advantages), "scores" (tensor, used by `--dynamic_filtering`, which expects
0..1) and "extra_logs" (dict of tensors, logged to wandb/tensorboard), as in OpenRLHF's
examples/python/reward_func.py.

What is scored (REWARDSERVE_INPUT): `query` (default) sends each query as `{"raw": query}`: exactly the text the
policy produced, as OpenRLHF's own `serve_rm` does; `pair` sends `{"prompt": prompt, "response": query minus the
prompt}` so the reward model applies its own template (use it when the prompts are plain text, without
`--apply_chat_template`). REWARDSERVE_STRIP: comma-separated strings (e.g. a pad token left by padded decoding)
removed from both ends of each query first. "scores" are the rewards as they are (raw logits): do not combine
with `--dynamic_filtering` unless the reward model's scores lie in 0..1. `labels` are not used.

The server is configured as for verl (clients/verl_reward.py): REWARDSERVE_URL, REWARDSERVE_API_KEY,
REWARDSERVE_TIMEOUT, REWARDSERVE_TRANSPORT; set them in the Ray job's `runtime_env` `env_vars`. torch is
imported only when `reward_func` runs, so this module imports without it. Some OpenRLHF versions wrap
`reward_func` in `ray.remote`, which pickles it by value (the module is loaded by path): as for verl
(clients/verl_reward.py), its globals are plain functions and constants, and the client cache lives in
`rewardserve.clients.adapter_clients`, imported by name in every worker.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

if __package__ in ("clients", "rewardserve.clients"):  # imported by name
    from .adapter_clients import client_from_env
    from .errors import InvalidInputError
else:  # loaded by file path (OpenRLHF): the helpers come through the import face, which no local module shadows
    from importlib import import_module

    client_from_env = import_module("rewardserve.clients.adapter_clients").client_from_env
    InvalidInputError = import_module("rewardserve.clients.errors").InvalidInputError

ENV_INPUT = "REWARDSERVE_INPUT"
ENV_STRIP = "REWARDSERVE_STRIP"
INPUT_MODES = ("query", "pair")


def strip_all(text: str, junk: Sequence[str]) -> str:
    """`text` without any of the `junk` strings at either end (repeatedly)."""
    changed = True
    while changed and junk:
        changed = False
        for piece in junk:
            while piece and text.startswith(piece):
                text, changed = text[len(piece):], True
            while piece and text.endswith(piece):
                text, changed = text[: -len(piece)], True
    return text


def openrlhf_inputs(queries: Sequence[str], prompts: Sequence[str], mode: str | None = None,
                    strip: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Server inputs for a batch of OpenRLHF queries (see the module docstring for `mode` and `strip`)."""
    mode = mode or os.environ.get(ENV_INPUT, "query")
    if mode not in INPUT_MODES:
        raise ValueError(f"{ENV_INPUT} is one of {INPUT_MODES}, got {mode!r}")
    if strip is None:
        strip = [s for s in os.environ.get(ENV_STRIP, "").split(",") if s]
    texts = [strip_all(q, strip) for q in queries]
    if mode == "query":
        return [{"raw": text} for text in texts]
    if len(prompts) != len(texts):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(texts)} queries", type="invalid_argument")
    inputs = []
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        prompt = strip_all(prompt, strip)
        if not text.startswith(prompt):
            raise InvalidInputError(f"inputs.{i}: the query does not start with its prompt; use "
                                    f"{ENV_INPUT}=query", type="invalid_argument")
        inputs.append({"prompt": prompt, "response": text[len(prompt):]})
    return inputs


ENV_MODEL = "REWARDSERVE_REWARD_MODEL"
"""Not REWARDSERVE_MODEL_NAME: that is the server's `model_name`, and a server started where the trainer's
environment is exported would take it as its own name."""


def score_full_queries(queries: Sequence[str], prompts: Sequence[str], **options: Any) -> list[Any]:
    """The ScoreResults for OpenRLHF-style queries, without torch. `options`: url, api_key, timeout, transport,
    model (a served model or ensemble; else $REWARDSERVE_REWARD_MODEL; else the default), mode, strip."""
    if not queries:
        return []
    inputs = openrlhf_inputs(queries, prompts, options.get("mode"), options.get("strip"))
    client = client_from_env(options.get("url"), options.get("api_key"), options.get("timeout"),
                             options.get("transport"))
    return client.score_full(inputs, model=options.get("model") or os.environ.get(ENV_MODEL) or None)


def score_queries(queries: Sequence[str], prompts: Sequence[str], **options: Any) -> tuple[list[float], list[bool]]:
    """(rewards, truncated flags) for OpenRLHF-style queries, without torch (options as score_full_queries)."""
    results = score_full_queries(queries, prompts, **options)
    return [r.reward for r in results], [r.truncated for r in results]


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's custom reward function: {"rewards", "scores", "extra_logs": {"rm_truncated"}}, float32
    tensors with one value per query. Extra keyword arguments (e.g. `metas` in some OpenRLHF forks) are ignored."""
    import torch  # OpenRLHF always has it; imported here so that clients/ imports without torch

    results = score_full_queries(queries, prompts)
    values = torch.tensor([r.reward for r in results], dtype=torch.float32)
    extra = {"rm_truncated": torch.tensor([r.truncated for r in results], dtype=torch.float32)}
    if results and results[0].members:  # an ensemble: each member's rewards and the std, logged by OpenRLHF
        for name in results[0].members:
            extra[f"rm_{name}"] = torch.tensor([r.members[name] for r in results], dtype=torch.float32)
        extra["rm_std"] = torch.tensor([r.std or 0.0 for r in results], dtype=torch.float32)
    return {"rewards": values, "scores": values.clone(), "extra_logs": extra}
