"""API keys on every scoring route (HTTP and gRPC); health, readiness and metrics stay open."""

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import GrpcRewardClient, RewardClient
from clients.errors import AuthenticationError
from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from service.keys import KeyChecker, load_keys
from tests.helpers import LiveServer, test_config

KEY, OTHER = "k-123456", "k-other"
BODIES = {
    "/v1/score": {"inputs": [{"prompt": "hi", "response": "hello"}]},
    "/get_reward": {"query": ["hi hello"]},
    "/classify": {"input": "hi hello"},
    "/pooling": {"input": "hi hello"},
}


@pytest.fixture(scope="module")
def keyed_server(tiny_bert_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# rotated keys\n{OTHER}\n")
    cfg = test_config(tiny_bert_dir, model_name="tiny-bert", api_keys=[KEY], api_key_file=str(key_file))
    with LiveServer(cfg) as server:
        yield server


def test_key_checker():
    checker = KeyChecker(["abc"])
    assert checker.check("Bearer abc") and checker.check(b"bearer abc")
    assert not checker.check("Bearer abd") and not checker.check("abc") and not checker.check(None)
    assert not KeyChecker([]).enabled


def test_keys_from_file(tmp_path):
    path = tmp_path / "k"
    path.write_text("one\n\n# comment\ntwo  # trailing\n")
    assert load_keys(["zero", " "], str(path)) == ["zero", "one", "two"]


@pytest.mark.parametrize("route", sorted(BODIES))
def test_http_scoring_routes_need_a_key(keyed_server, route):
    url = keyed_server.http_url + route
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=BODIES[route], headers=headers)
        assert r.status_code == 401, (route, headers, r.text)
        assert r.json()["error"]["type"] == "unauthenticated"
        assert r.headers["www-authenticate"] == "Bearer"
    for key in (KEY, OTHER):
        r = httpx.post(url, json=BODIES[route], headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text


def test_every_registered_http_route_needs_a_key(keyed_server):
    """Walks the app's own route table, so a route added later cannot be forgotten."""
    app = keyed_server.runtime.app
    open_routes = set(keyed_server.config.open_routes)
    checked = 0
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD":
                continue
            r = httpx.request(method, keyed_server.http_url + route.path, json={}, timeout=10)
            if route.path in open_routes:
                assert r.status_code != 401, route.path
            else:
                assert r.status_code == 401, (method, route.path, r.status_code)
                assert r.json()["error"]["type"] == "unauthenticated"
                checked += 1
    assert checked >= 12  # score, compat (5), best-of-n, rerank, models, openapi, docs, ...


def test_every_grpc_method_needs_a_key(keyed_server):
    """Walks the service descriptor: every RewardService method refuses a call without a key."""
    service = pb.DESCRIPTOR.services_by_name["RewardService"]
    with grpc.insecure_channel(keyed_server.grpc_target) as channel:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            request = method.input_type._concrete_class()
            kwargs = dict(request_serializer=type(request).SerializeToString,
                          response_deserializer=method.output_type._concrete_class.FromString)
            with pytest.raises(grpc.RpcError) as err:
                if method.client_streaming and method.server_streaming:
                    list(channel.stream_stream(path, **kwargs)(iter([request]), timeout=10))
                elif method.server_streaming:
                    list(channel.unary_stream(path, **kwargs)(request, timeout=10))
                elif method.client_streaming:
                    channel.stream_unary(path, **kwargs)(iter([request]), timeout=10)
                else:
                    channel.unary_unary(path, **kwargs)(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name


def test_api_key_is_the_primary_flag_and_repeats():
    from rewardserve.cli import build_parser
    from service.config import resolve

    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b,c", "--api-keys", "d"])
    assert resolve(args, environ={}).api_keys == ["a", "b", "c", "d"]


@pytest.mark.parametrize("route", ["/health", "/ready", "/metrics"])
def test_open_routes(keyed_server, route):
    assert httpx.get(keyed_server.http_url + route).status_code == 200


def test_models_and_docs_need_a_key(keyed_server):
    assert httpx.get(keyed_server.http_url + "/v1/models").status_code == 401
    assert httpx.get(keyed_server.http_url + "/openapi.json").status_code == 401


def test_grpc_needs_a_key_but_health_is_open(keyed_server):
    from prometheus_client import REGISTRY

    request = pb.ScoreRequest(inputs=[pb.ScoreInput(raw="hi hello")])
    counted = {"transport": "grpc", "route": "Score", "code": "UNAUTHENTICATED"}
    before = REGISTRY.get_sample_value("rewardserve_requests_total", counted) or 0
    with grpc.insecure_channel(keyed_server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(request, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ("rewardserve-error-type", "unauthenticated") in tuple(err.value.trailing_metadata())
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ScoreStream(iter([request]), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Score(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=10).scores
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert REGISTRY.get_sample_value("rewardserve_requests_total", counted) == before + 2  # as HTTP counts its 401s


def test_clients_send_their_key(keyed_server):
    with RewardClient(keyed_server.http_url, api_key=KEY) as client:
        http_rewards = client.score([("hi", "hello")])
    with GrpcRewardClient(keyed_server.grpc_target, api_key=KEY) as client:
        assert client.score([("hi", "hello")]) == http_rewards
    with RewardClient(keyed_server.http_url, api_key="wrong", max_retries=3) as client:
        with pytest.raises(AuthenticationError):
            client.score([("hi", "hello")])


def test_keys_from_env_are_comma_separated():
    from service.config import resolve

    cfg = resolve(None, environ={"REWARDSERVE_API_KEYS": "a, b,,c"})
    assert cfg.api_keys == ["a", "b", "c"]


def test_keys_from_flag_are_comma_separated():
    from rewardserve.cli import build_parser
    from service.config import resolve

    args = build_parser().parse_args(["serve", "--api-keys", "x, y"])
    assert resolve(args, environ={}).api_keys == ["x", "y"]
