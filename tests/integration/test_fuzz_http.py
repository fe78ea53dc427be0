"""Schemathesis against the OpenAPI document a live server serves: every operation, valid and invalid
requests, a bounded number of examples each. No answer may be a 5xx (the one allowed is 504 deadline_exceeded
for a request that asked for a deadline, which is the answer it asked for), every error has our error shape,
and the server is healthy afterwards. A few raw, non-schema requests (bad JSON, wrong content types, bodies
that are not objects) go to every POST route too.
"""

from __future__ import annotations

import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.helpers import LiveServer, test_config

pytestmark = pytest.mark.slow  # a few hundred generated requests
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 25}


@pytest.fixture(scope="module")
def fuzz_server(tiny_bert_dir):
    # small limits, so that generated requests reach them (413, too many inputs) instead of only valid sizes
    config = test_config(tiny_bert_dir, model_name="fuzz", max_inputs_per_request=16, max_body_bytes=64 * 1024,
                         max_tokens=64)
    with LiveServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.http_url + "/openapi.json")


def asked_for_deadline(case) -> bool:
    headers = {k.lower(): v for k, v in (case.headers or {}).items()}
    body = case.body if isinstance(case.body, dict) else {}
    return "x-request-timeout" in headers or body.get("timeout") is not None


def check_answer(case, response) -> None:
    label = f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
    if response.status_code == 504:
        assert asked_for_deadline(case), label
        assert response.json()["error"]["type"] == "deadline_exceeded", label
        return
    if response.status_code == 501:  # this server has no Best-of-N generator: a typed answer, not a failure
        assert case.path == "/v1/best-of-n" and response.json()["error"]["type"] == "not_implemented", label
        return
    assert response.status_code < 500, label
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] == response.status_code and error["type"] and error["message"], label


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_lists_every_scoring_route(schema):
    paths = {op.path for op in operations(schema)}
    assert {"/v1/score", "/get_reward", "/classify", "/pooling", "/health", "/ready", "/v1/models"} <= paths


def fuzz(operation, mode: GenerationMode, base_url: str, session: requests.Session, codes: set[int]):
    """A hypothesis test of one operation: every generated request is sent, its status kept and checked."""

    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base_url, session=session, timeout=30)
        codes.add(response.status_code)
        check_answer(case, response)

    return run


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_no_operation_answers_5xx(fuzz_server, schema, mode):
    seen: dict[str, set[int]] = {}
    no_invalid_form: list[str] = []  # operations whose schema admits every request (nothing to negate)
    with requests.Session() as session:
        for operation in operations(schema):
            label = f"{operation.method.upper()} {operation.path}"
            try:
                fuzz(operation, mode, fuzz_server.http_url, session, seen.setdefault(label, set()))()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, label
                no_invalid_form.append(label)
                del seen[label]
    assert len(seen) + len(no_invalid_form) == len(operations(schema))  # every operation was exercised
    if mode is GenerationMode.POSITIVE:
        # valid requests got through (the vLLM routes mostly draw a non-numeric X-Request-Timeout: 400)
        assert 200 in seen["POST /v1/score"] and 200 in seen["POST /get_reward"], seen
    else:
        assert {"POST /v1/score", "POST /get_reward"} <= set(seen)
        assert 422 in seen["POST /v1/score"]
    assert httpx.get(fuzz_server.http_url + "/ready", timeout=10).status_code == 200


BAD_BODIES = [
    (b"", "application/json"), (b"{", "application/json"), (b"null", "application/json"),
    (b"[]", "application/json"), (b'"text"', "application/json"), (b"\xff\xfe\x00", "application/json"),
    (b'{"inputs": [{"prompt": "a", "response": "b"}]}', "text/plain"),
    (b"inputs=1", "application/x-www-form-urlencoded"), (json.dumps({"a" * 10: [[[[[]]]]]}).encode(), "application/json"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
]


def test_raw_bad_bodies_are_4xx_on_every_post_route(fuzz_server, schema):
    posts = sorted(op.path for op in operations(schema) if op.method.upper() == "POST")
    assert {"/v1/score", "/get_reward", "/classify", "/pooling"} <= set(posts)
    with httpx.Client(base_url=fuzz_server.http_url, timeout=30) as client:
        for path in posts:
            for body, content_type in BAD_BODIES:
                response = client.post(path, content=body, headers={"content-type": content_type})
                assert 400 <= response.status_code < 500, (path, body[:40], response.status_code, response.text[:200])
                assert response.json()["error"]["code"] == response.status_code
            for method in ("GET", "PUT", "DELETE"):
                assert client.request(method, path).status_code == 405
        assert client.get("/health").status_code == 200
