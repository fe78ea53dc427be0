"""Client-side conversions without a server: trainer chat messages (tool calling included) as the server takes
them, the gRPC form of a message, the never-raising scoring of `on_error="none"`, and the `rewardserve.clients`
/ `rewardserve.protos` import face loaded beside `clients` / `protos` in one process."""

from __future__ import annotations

import json

import pytest

from clients.errors import InvalidInputError, NotFoundError, UnavailableError
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
        if any("bad" in item["raw"] for item in inputs):
            raise InvalidInputError("inputs.0: refused", type="invalid_argument")
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
