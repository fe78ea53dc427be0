"""TRL 1.16 GRPO with tool calling, through TRL's own `GRPOTrainer._calculate_rewards` (issue #12.7).

TRL's `_tool_call_loop` builds a completion as [assistant turn with `tool_calls` (content often ""), one
`{"role": "tool", "name", "content"}` message per call, the assistant's next turn, ...], and
`_calculate_rewards` calls every reward function as `f(prompts=, completions=, completion_ids=, **columns,
trainer_state=, log_extra=, log_metric=)`, turns None into NaN and checks there is one reward per prompt. The
trainer here is a stand-in holding only what that method reads; the method itself is TRL's.
"""

from __future__ import annotations

import asyncio
import math
import threading
from types import SimpleNamespace

import pytest

from clients import RewardClient, make_async_trl_reward_func, make_trl_reward_func
from clients.errors import InvalidInputError
from clients.messages import clean_messages

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL (the [dev] extra)")

CALL = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}
PROMPT = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 3 times 4?"}]
TOOL_COMPLETION = [
    {"role": "assistant", "content": "", "tool_calls": [CALL]},  # trl.chat_template_utils.parse_response
    {"role": "tool", "name": "multiply", "content": "12"},  # _tool_call_loop: str(result)
    {"role": "assistant", "content": "3 times 4 is 12."},
]
TOOL_COMPLETION_MULTIMODAL = [
    {"role": "assistant", "content": "Let me compute.", "tool_calls": [CALL, CALL]},
    {"role": "tool", "name": "multiply", "content": [{"type": "text", "text": "12"}]},  # a list result as is
    {"role": "tool", "name": "multiply", "content": "12"},
    {"role": "assistant", "content": "12."},
]
PLAIN_COMPLETION = [{"role": "assistant", "content": "It is 12."}]
REFUSED = [{"role": "robot", "content": "beep"}]  # a role the server refuses (422 / INVALID_ARGUMENT)


class AsyncLoopThread:
    """TRL's `async_loop`: an event loop running in a thread."""

    def __enter__(self) -> asyncio.AbstractEventLoop:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self.loop

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def calculate_rewards(reward_funcs: list, completions: list, loop=None) -> tuple[list[list[float]], list]:
    """TRL's `_calculate_rewards` on one batch (one prompt per completion); rows are completions."""
    metrics: list = []
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", is_main_process=True), args=SimpleNamespace(report_to=[]),
        state=SimpleNamespace(global_step=0), reward_funcs=reward_funcs,
        reward_processing_classes=[None] * len(reward_funcs), reward_func_names=[f.__name__ for f in reward_funcs],
        _log_completion_extra=lambda column, values: None, _log_metric=lambda *a: metrics.append(a),
        environments=None, async_loop=loop,
    )
    prompts = [list(PROMPT) for _ in completions]
    inputs = [{"prompt": p, "task": "math"} for p in prompts]  # "task": a dataset column, passed through
    ids = [[1, 2, 3] for _ in completions]
    rewards = trl_grpo.GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, ids)
    return rewards.tolist(), metrics


def server_scores(server, completions: list) -> list[float]:
    with RewardClient(server.http_url) as client:
        return client.score([{"messages": clean_messages([*PROMPT, *c])} for c in completions])


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


@pytest.fixture(scope="module", params=["bert_server", "llama_server"])  # plain format, and a chat template
def server(request):
    return request.getfixturevalue(request.param)


def test_tool_calling_completions_are_scored_over_both_transports(server):
    completions = [TOOL_COMPLETION, TOOL_COMPLETION_MULTIMODAL, PLAIN_COMPLETION]
    funcs = [make_trl_reward_func(server.http_url, name="http"),
             make_async_trl_reward_func(server.grpc_target, transport="grpc", name="grpc")]
    with AsyncLoopThread() as loop:
        rows, metrics = calculate_rewards(funcs, completions, loop)

    expected = server_scores(server, completions)
    assert all(close(http, e) and close(grpc, e) for (http, grpc), e in zip(rows, expected))
    assert len(set(expected)) == 3  # the tool call and its result change the score
    assert ("http/truncated", 0.0) in metrics and ("grpc/truncated", 0.0) in metrics
    # the call-only assistant turn carries the call, so the reward model sees it
    assert "<tool_call>" in clean_messages(TOOL_COMPLETION)[0]["content"]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_on_error_none_costs_only_the_refused_completions(bert_server, transport):
    url = bert_server.http_url if transport == "http" else bert_server.grpc_target
    completions = [TOOL_COMPLETION, REFUSED, PLAIN_COMPLETION, [{"role": "assistant", "content": "\ud800"}]]
    funcs = [make_trl_reward_func(url, transport=transport, on_error="none", name="sync"),
             make_async_trl_reward_func(url, transport=transport, on_error="none", name="async")]
    with AsyncLoopThread() as loop:
        rows, metrics = calculate_rewards(funcs, completions, loop)

    good = server_scores(bert_server, [TOOL_COMPLETION, PLAIN_COMPLETION])
    for row in (rows[1], rows[3]):  # refused by the server / not valid Unicode: NaN (None) for these alone
        assert all(math.isnan(v) for v in row)
    assert all(close(v, good[0]) for v in rows[0]) and all(close(v, good[1]) for v in rows[2])
    assert ("sync/failed", 0.5) in metrics and ("async/failed", 0.5) in metrics

    with pytest.raises(InvalidInputError):  # on_error="raise" (the default) still stops on invalid input
        calculate_rewards([make_trl_reward_func(url, transport=transport)], completions)


def test_on_error_none_never_raises(bert_server):
    func = make_trl_reward_func(bert_server.http_url, on_error="none")
    assert func(prompts=["a", "b"], completions=["c"]) == [None, None]  # TRL checks len(prompts)
    assert func(prompts=[PROMPT], completions=[[{"content": "no role"}]]) == [None]
    assert func(prompts=[PROMPT, "text"], completions=[PLAIN_COMPLETION, PLAIN_COMPLETION])[1] is None
    assert func(prompts=None, completions=None) == []
    broken = make_trl_reward_func(bert_server.http_url, on_error="none")
    broken._score = lambda inputs: [SimpleNamespace(reward="not a number", truncated=False, normalized=None)]
    assert broken(prompts=["a"], completions=["b"]) == [None]  # an unexpected reply shape
