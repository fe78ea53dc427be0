"""A rewardserve server as a verl custom reward function. See docs/integrations.md.

verl loads `custom_reward_function.path` (a file path, or `pkg://rewardserve.clients.verl_reward`) and takes the function
`custom_reward_function.name` from it (`verl.trainer.ppo.reward.get_custom_reward_fn`; the section is
`reward.custom_reward_function` in recent verl). Its reward managers call it with keywords:

- per sample (`naive`, `dapo`, `prime` managers): `compute_score(data_source=, solution_str=, ground_truth=,
  extra_info=)` -> float (or a dict with "score");
- per batch (`reward_model.reward_manager=batch`): `compute_score_batch(data_sources=, solution_strs=,
  ground_truths=, extra_infos=)` -> one float per sample;

plus `custom_reward_function.reward_kwargs` (they take precedence) and, in verl's newer reward loop,
`reward_router_address` / `reward_model_tokenizer`, which are ignored here.

What is scored: `solution_str` is the decoded response alone; verl does not pass the prompt. If the sample's
`extra_info` carries one under `prompt` (put it there when you build the parquet file; the key can be changed
with `prompt_key`), the server scores `{"prompt": prompt, "response": solution_str}` for a text prompt, or
`{"messages": prompt + [assistant turn]}` for a chat prompt (a list of `{"role", "content"}`), so the reward
model sees the question with its own template. Otherwise it scores `{"raw": solution_str}`. `data_source` and
`ground_truth` are not used: the reward is the reward model's raw score.

Configuration, read at call time, each overridable by a `reward_kwargs` entry of the same lower-case name:
REWARDSERVE_URL (required: an `http(s)://` base URL, or a gRPC `host:port` / `grpc://host:port` target;
comma-separated for several servers), REWARDSERVE_API_KEY, REWARDSERVE_TIMEOUT (seconds per call, default 60),
REWARDSERVE_TRANSPORT (`http` or `grpc`; default: from the URL). Ray workers need these variables too: set them
in the job's `runtime_env` `env_vars`. One client is opened per process and configuration and reused.

Shipping to Ray workers: verl loads this file by path under a module name no worker can import, so Ray
(cloudpickle) pickles `compute_score` by value with the module globals it uses. Those are plain functions and
constants; the client cache and the helpers live in `rewardserve.clients.adapter_clients` / `.messages`,
which a worker imports by name (the file imports them through the `rewardserve.clients` face when loaded by
path), so the functions pickle, and every copy unpickled in one process shares that process's client.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

if __package__ in ("clients", "rewardserve.clients"):  # imported by name
    from .adapter_clients import (  # noqa: F401 (re-exported: the configuration names)
        DEFAULT_TIMEOUT, ENV_API_KEY, ENV_TIMEOUT, ENV_TRANSPORT, ENV_URL, client_from_env, settings, transport_of,
    )
    from .errors import InvalidInputError
    from .messages import clean_messages
else:  # loaded by file path (verl): the helpers come through the import face, which no local module shadows
    from importlib import import_module

    client_from_env = import_module("rewardserve.clients.adapter_clients").client_from_env
    clean_messages = import_module("rewardserve.clients.messages").clean_messages
    InvalidInputError = import_module("rewardserve.clients.errors").InvalidInputError


# ---- inputs -------------------------------------------------------------------------------------------
def verl_input(solution_str: str, extra_info: Mapping[str, Any] | None, prompt_key: str = "prompt") -> dict:
    """The server input for one verl sample (see the module docstring)."""
    prompt = extra_info.get(prompt_key) if isinstance(extra_info, Mapping) else None
    if isinstance(prompt, str):
        return {"prompt": prompt, "response": solution_str}
    if prompt is not None and not isinstance(prompt, (bytes, Mapping)):
        try:  # a list (or numpy array, from parquet) of chat messages
            messages = clean_messages(list(prompt))
        except (TypeError, KeyError, AttributeError, InvalidInputError):
            messages = []  # not a message list: score the response alone
        if messages:
            return {"messages": [*messages, {"role": "assistant", "content": solution_str}]}
    return {"raw": solution_str}


def _client_and_options(kwargs: Mapping[str, Any]) -> tuple[Any, str, bool]:
    client = client_from_env(kwargs.get("url"), kwargs.get("api_key"), kwargs.get("timeout"),
                             kwargs.get("transport"))
    return client, kwargs.get("prompt_key", "prompt"), bool(kwargs.get("normalize", False))


def _values(results: list, normalize: bool, members: bool = False) -> list[Any]:
    """The rewards; with `members` (an ensemble's), verl's dict form: {"score", "std", "<member>": reward, ...}
    (verl logs the extra keys)."""
    values = [r.normalized if normalize and r.normalized is not None else r.reward for r in results]
    if not members:
        return values
    return [{"score": v, **({"std": r.std} if r.std is not None else {}), **(r.members or {})}
            for v, r in zip(values, results)]


def _score_kwargs(kwargs: Mapping[str, Any], normalize: bool) -> dict[str, Any]:
    return {"normalize": normalize, "model": kwargs.get("model") or None}


# ---- verl entry points --------------------------------------------------------------------------------
def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> float:
    """verl's per-sample reward function: the reward model's score of `solution_str` (with the prompt from
    `extra_info[prompt_key]` when there is one). `reward_kwargs`: url, api_key, timeout, transport,
    prompt_key, normalize, model (a served model or ensemble), return_members (an ensemble's members and std in
    verl's dict form)."""
    client, prompt_key, normalize = _client_and_options(kwargs)
    results = client.score_full([verl_input(solution_str, extra_info, prompt_key)], **_score_kwargs(kwargs, normalize))
    return _values(results, normalize, bool(kwargs.get("return_members")))[0]


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Mapping[str, Any] | None] | None = None, **kwargs: Any) -> list[float]:
    """verl's batch reward function (`reward_manager=batch`): one score per sample, sent as one call (split
    into requests of the client's `max_batch_size`)."""
    if len(solution_strs) == 0:  # a list, or a numpy array (whose truth value is ambiguous)
        return []
    client, prompt_key, normalize = _client_and_options(kwargs)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    inputs = [verl_input(s, info, prompt_key) for s, info in zip(solution_strs, infos, strict=True)]
    results = client.score_full(inputs, **_score_kwargs(kwargs, normalize))
    return _values(results, normalize, bool(kwargs.get("return_members")))
