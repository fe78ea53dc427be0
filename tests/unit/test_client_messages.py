"""Client-side conversions without a server: trainer chat messages (tool calling included) as the server takes
them, the gRPC form of a message, the never-raising scoring of `on_error="none"`, and the `rewardserve.clients`
/ `rewardserve.protos` import face loaded beside `clients` / `protos` in one process."""

from __future__ import annotations

import asyncio
import json

import pytest

from clients.errors import InvalidInputError, NotFoundError, ServerError, UnavailableError
from clients.grpc_client import to_proto
from clients.lenient import ascore_isolating, expected_count, lenient_inputs, score_isolating, spread
from clients.messages import clean_messages, render_tool_calls
from clients.trl_adapter import trl_input

CALL = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}
CALL_BLOCK = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'


# ---- messages -----------------------------------------------------------------------------------------
def test_tool_calls_are_rendered_into_the_assistant_content():
    messages = clean_messages([
        {"role": "user", "content": "3 times 4?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},  # TRL's parse_response shape
        {"role": "tool", "name": "multiply", "content": "12"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, CALL]},
        {"role": "function", "name": "multiply", "tool_call_id": "call_1", "content": [{"type": "text", "text": "12"}]},
        {"role": "assistant", "content": "It is 12.", "tool_calls": None},
    ])
    assert messages == [
        {"role": "user", "content": "3 times 4?"},
        {"role": "assistant", "content": CALL_BLOCK},  # a call-only turn is not empty
        {"role": "tool", "content": "12", "name": "multiply"},
        {"role": "assistant", "content": f"Let me check.\n{CALL_BLOCK}\n{CALL_BLOCK}"},
        {"role": "function", "content": "12", "name": "multiply", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 12."},
    ]


def test_tool_call_forms():
    openai_string_args = {"type": "function", "function": {"name": "f", "arguments": '{"x": "é"}'}}
    assert render_tool_calls([openai_string_args]) == '<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n</tool_call>'
    assert '"arguments": "not json"' in render_tool_calls([{"name": "f", "arguments": "not json"}])  # bare form
    assert render_tool_calls({"odd": 1}) == '<tool_call>\n{"odd": 1}\n</tool_call>'  # unknown shape: as JSON
    assert render_tool_calls([]) == render_tool_calls(None) == ""


def test_trl_input_with_tools_keeps_the_conversation_order():
    prompt = [{"role": "user", "content": "3 times 4?"}]
    completion = [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "name": "multiply", "content": "12"},
                  {"role": "assistant", "content": "12."}]
    assert [m["role"] for m in trl_input(0, prompt, completion)["messages"]] == ["user", "assistant", "tool",
                                                                                "assistant"]


def test_grpc_message_carries_tool_fields():
    item = {"messages": [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "name": "multiply", "tool_call_id": "c1", "content": "12"},
                         {"role": "assistant", "content": "12."}]}
    first, tool, _ = to_proto(0, item).conversation.messages
    assert json.loads(first.tool_calls_json) == [CALL] and first.content == ""
    assert (tool.role, tool.name, tool.tool_call_id, tool.tool_calls_json) == ("tool", "multiply", "c1", "")


# ---- on_error="none" ----------------------------------------------------------------------------------
class FakeServer:
    """Scores by length; refuses a batch (as a whole, like a 422) when any input holds "bad"."""

    def __init__(self, error: Exception | None = None):
        self.batches: list[int] = []
        self.error = error

    def __call__(self, inputs):
        self.batches.append(len(inputs))
        if self.error is not None:
            raise self.error
        bad = [k for k, item in enumerate(inputs) if "bad" in item["raw"]]
        if bad:
            raise InvalidInputError(f"inputs.{bad[0]}: refused", type="invalid_argument")
        nan = [k for k, item in enumerate(inputs) if "nan" in item["raw"]]
        if nan:  # the model fails on one input: the server fails the whole request with a 500 backend_error
            raise ServerError(f"inputs.{nan[0]}: the model produced a non-finite reward", type="backend_error")
        return [len(item["raw"]) for item in inputs]


def raws(*texts):
    return [{"raw": t} for t in texts]


def test_a_refused_input_costs_only_itself():
    server, errors = FakeServer(), []
    assert score_isolating(server, raws("a", "bb", "bad", "cccc", "ddddd"), errors) == [1, 2, None, 4, 5]
    assert len(errors) == 1 and server.batches[0] == 5 and len(server.batches) <= 2 * 5


async def test_a_refused_input_costs_only_itself_async():
    server, errors = FakeServer(), []

    async def score(inputs):
        return server(inputs)

    assert await ascore_isolating(score, raws("bad", "bb", "bad2"), errors) == [None, 2, None]


@pytest.mark.parametrize("error", [UnavailableError("down"), NotFoundError("no such model"), KeyError("bug")])
def test_other_failures_give_none_to_the_whole_batch_without_halving(error):
    server, errors = FakeServer(error), []
    assert score_isolating(server, raws("a", "b", "c"), errors) == [None] * 3
    assert server.batches == [3] and errors == [error]


def test_a_wrong_count_of_results_is_a_failure():
    errors = []
    assert score_isolating(lambda inputs: [1.0], raws("a", "b"), errors) == [None, None] and errors


def test_lenient_inputs_and_spread():
    errors = []
    inputs = lenient_inputs(trl_input, ["p", "p", [{"role": "user", "content": "q"}]],
                            ["r", [{"role": "assistant", "content": "x"}], [{"role": 3}]], errors)
    assert inputs[0] == {"prompt": "p", "response": "r"} and inputs[1] is None  # text with messages
    assert inputs[2] == {"messages": [{"role": "user", "content": "q"}, {"role": "3", "content": ""}]}
    assert len(errors) == 1 and spread([None, {"raw": "a"}, None], [7]) == [None, 7, None]
    with pytest.raises(InvalidInputError):
        lenient_inputs(trl_input, ["p"], [], [])
    assert expected_count(["a", "b"], None) == 2 and expected_count(None, ["c"]) == 1 and expected_count(1, 2) == 0


def test_a_failed_request_costs_only_its_own_inputs():
    """Sent as requests of `batch_size`, one failed request (server down, a 500) gets None for its own inputs;
    the rewards of the others are kept (they were thrown away with the whole call)."""
    server, errors = FakeServer(), []

    def score(inputs):
        if inputs[0]["raw"] == "i":
            raise UnavailableError("down")
        return server(inputs)

    rewards = score_isolating(score, raws(*"abcdefghijkl"), errors, batch_size=4)
    assert rewards == [1] * 8 + [None] * 4 and len(errors) == 1 and server.batches == [4, 4]


async def test_a_failed_request_costs_only_its_own_inputs_async():
    server, errors, in_flight, most = FakeServer(), [], [0], [0]

    async def score(inputs):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.01)
        in_flight[0] -= 1
        if inputs[0]["raw"] == "e":
            raise UnavailableError("down")
        return server(inputs)

    rewards = await ascore_isolating(score, raws(*"abcdefghijkl"), errors, batch_size=2, concurrency=3)
    assert rewards == [1, 1, 1, 1, None, None, 1, 1, 1, 1, 1, 1] and len(errors) == 1 and most[0] == 3


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_backend_failure_costs_only_the_input_that_caused_it(asynchronous):
    """A 500 backend_error (the model produced NaN on one input) is isolated like a refusal."""
    server, errors = FakeServer(), []
    inputs = raws("a", "bb", "ccc", "nan!", "eeeee", "ffffff", "nan?", "hhhhhhhh")
    if asynchronous:
        async def score(part):
            return server(part)

        rewards = asyncio.run(ascore_isolating(score, inputs, errors))
    else:
        rewards = score_isolating(server, inputs, errors)
    assert rewards == [1, 2, 3, None, 5, 6, None, 8] and len(errors) == 2
    assert all(isinstance(e, ServerError) for e in errors)
    assert sorted(e.message.split(":")[0] for e in errors) == ["inputs.3", "inputs.6"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_refused_inputs_error_names_its_place_in_the_call(asynchronous):
    """The input refused in the second half of a halved request is named by its place in the whole call (the
    server named it within the half it was sent in), and so are inputs after ones that could not be converted."""
    server, errors = FakeServer(), []
    inputs = raws("a", "b", "c", "d", "e", "f", "bad", "h")
    positions = [0, 1, 2, 4, 5, 6, 8, 9]  # inputs 3 and 7 of the call could not be converted
    if asynchronous:
        async def score(part):
            return server(part)

        rewards = asyncio.run(ascore_isolating(score, inputs, errors, positions=positions))
    else:
        rewards = score_isolating(server, inputs, errors, positions=positions)
    assert rewards == [1] * 6 + [None, 1]
    assert [e.message for e in errors] == ["inputs.8: refused"]


@pytest.mark.parametrize("prompt,completion,where", [
    ([{"role": "user", "content": "q"}], None, "inputs.2: prompt and completion must both be text or both be"),
    ([{"role": "user", "content": "q"}], {"role": "assistant", "content": "a"}, "inputs.2: prompt and completion"),
    ([{"role": "user", "content": "q"}], [{"content": "a"}], "inputs.2.messages.1: a message needs a 'role'"),
    ([{"role": "user", "content": "q"}], ["a"], "inputs.2.messages.1: a message is a mapping"),
    ("q", None, "inputs.2: prompt and completion"),
])
def test_malformed_conversations_are_invalid_inputs(prompt, completion, where):
    with pytest.raises(InvalidInputError) as info:
        trl_input(2, prompt, completion)
    assert info.value.message.startswith(where), info.value.message
    errors = []  # on_error="none": that pair gets None, the others are converted
    assert lenient_inputs(trl_input, ["p", prompt], ["r", completion], errors)[1] is None and len(errors) == 1


@pytest.mark.parametrize("on_error", ["raise", "none"])
def test_trl_funcs_give_no_rewards_for_no_completions(on_error):
    """As the verl and OpenRLHF adapters do (nothing is sent: no server listens there)."""
    from clients.trl_adapter import AsyncTrlRewardFunc, TrlRewardFunc

    assert TrlRewardFunc("http://127.0.0.1:1", on_error=on_error)(prompts=[], completions=[]) == []
    func = AsyncTrlRewardFunc("http://127.0.0.1:1", on_error=on_error)
    assert asyncio.run(func(prompts=[], completions=[])) == []


# ---- the import face ----------------------------------------------------------------------------------
def test_import_face_is_the_clients_package_under_another_name():
    import clients
    import protos.reward_pb2
    import rewardserve.clients
    import rewardserve.clients.grpc_client as face_grpc
    import rewardserve.protos.reward_pb2

    assert rewardserve.clients.__file__ == clients.__file__
    assert rewardserve.clients.RewardClient.__module__ == "rewardserve.clients.http_client"
    assert set(rewardserve.clients.__all__) == set(clients.__all__)
    # the face's gRPC client uses rewardserve.protos, and protobuf shares one class per message between names
    assert face_grpc.reward_pb2 is rewardserve.protos.reward_pb2
    assert rewardserve.protos.reward_pb2.ScoreRequest is protos.reward_pb2.ScoreRequest
    request = rewardserve.protos.reward_pb2.ScoreRequest(model="m", inputs=[to_proto(0, {"raw": "x"})])
    assert protos.reward_pb2.ScoreRequest.FromString(request.SerializeToString()) == request


def test_invalid_unicode_fails_locally_before_sending():
    from clients import GrpcRewardClient, RewardClient

    with RewardClient("http://127.0.0.1:1", max_retries=0) as http, GrpcRewardClient("127.0.0.1:1") as rpc:
        for client in (http, rpc):  # nothing listens there: only a local check can answer InvalidInputError
            with pytest.raises(InvalidInputError, match="candidates.1: a lone UTF-16 surrogate"):
                client.rerank(["fine", "bad \ud800"], "prompt")
            with pytest.raises(InvalidInputError, match="inputs.0.prompt: a lone"):
                client.score([("\udc00", "response")])
