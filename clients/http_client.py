"""HTTP clients (httpx): `RewardClient` (blocking) and `AsyncRewardClient` (asyncio).

Each request carries `X-Request-Id` and, when the call has a timeout, `X-Request-Timeout` with the seconds
left (the server gives up on it then: 504); the API key goes in `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import ssl
from typing import Any, Mapping, Sequence

import httpx

from .base import PROBE_TIMEOUT_S, AsyncClient, SyncClient
from .loops import PerLoop
from .errors import DeadlineExceededError, RewardClientError, ServerError, UnavailableError, http_error
from .types import ModelInfo, ScoreResult, check_count
from .ranking import AsyncRanking, RankedResult, SyncRanking, parse_ranked

TIMEOUT_HEADER = "X-Request-Timeout"
REQUEST_ID_HEADER = "X-Request-Id"
USER_AGENT = "rewardserve-client/0.1"


# ---- requests -----------------------------------------------------------------------------------------
def base_urls(endpoints: str | Sequence[str]) -> list[str]:
    urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"an HTTP endpoint is a base URL like http://host:8000, got {url!r}")
    return [url.rstrip("/") for url in urls]


def tls_verify(ca_cert: str | None, client_cert: str | None, client_key: str | None,
               verify: bool) -> bool | ssl.SSLContext:
    """httpx's `verify`: True (system CAs), False, or an SSL context with our CA and client certificate."""
    if ca_cert is None and client_cert is None:
        return verify
    context = ssl.create_default_context(cafile=ca_cert)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    return context


def client_options(api_key: str | None, headers: Mapping[str, str] | None, verify: bool | ssl.SSLContext,
                   httpx_options: Mapping[str, Any] | None) -> dict[str, Any]:
    base_headers = {"User-Agent": USER_AGENT}
    if api_key:
        base_headers["Authorization"] = f"Bearer {api_key}"
    base_headers.update(headers or {})
    return {"headers": base_headers, "verify": verify, **(httpx_options or {})}


def request_headers(request_id: str, remaining: float | None) -> dict[str, str]:
    headers = {REQUEST_ID_HEADER: request_id}
    if remaining is not None:
        headers[TIMEOUT_HEADER] = f"{remaining:.3f}"
    return headers


def timeout_of(remaining: float | None, connect_timeout: float) -> httpx.Timeout:
    if remaining is None:
        return httpx.Timeout(None, connect=connect_timeout)
    return httpx.Timeout(remaining, connect=min(remaining, connect_timeout))


def score_body(chunk: Sequence[dict], normalize: bool, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": list(chunk)}
    if normalize:
        body["normalize"] = True
    if model:
        body["model"] = model
    return body


def transport_error(exc: httpx.HTTPError, endpoint: str) -> RewardClientError:
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
        return DeadlineExceededError(f"no answer within the timeout ({type(exc).__name__})",
                                     type="deadline_exceeded", endpoint=endpoint)
    if isinstance(exc, httpx.TransportError):  # refused, reset, closed mid-answer, connect timeout
        return UnavailableError(f"{type(exc).__name__}: {exc or 'connection failed'}", type="connection_error",
                                endpoint=endpoint)
    return ServerError(f"{type(exc).__name__}: {exc}", type="bad_response", endpoint=endpoint)


# ---- answers ------------------------------------------------------------------------------------------
def answer_json(response: httpx.Response, endpoint: str) -> Any:
    if not response.is_success:
        raise http_error(response.status_code, response.content, endpoint)
    try:
        return response.json()
    except ValueError:
        raise ServerError(f"HTTP {response.status_code} answer is not JSON", type="bad_response",
                          endpoint=endpoint) from None


def parse_scores(response: httpx.Response, endpoint: str, expected: int) -> list[ScoreResult]:
    data = answer_json(response, endpoint)
    try:
        results = [
            ScoreResult(float(s["reward"]), bool(s["truncated"]), int(s["tokens"]),
                        None if s.get("normalized") is None else float(s["normalized"]),
                        None if s.get("step_rewards") is None else [float(x) for x in s["step_rewards"]],
                        None if s.get("members") is None else {str(k): float(v) for k, v in s["members"].items()},
                        None if s.get("std") is None else float(s["std"]))
            for s in data["scores"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ServerError(f"unexpected score answer: {exc!r}", type="bad_response", endpoint=endpoint) from None
    return check_count(results, expected, endpoint)


def parse_models(response: httpx.Response, endpoint: str) -> list[ModelInfo]:
    data = answer_json(response, endpoint)
    try:
        return [
            ModelInfo(m["id"], int(m.get("max_model_len") or 0),
                      None if not m.get("normalization") else
                      (float(m["normalization"]["mean"]), float(m["normalization"]["std"])),
                      str(m.get("kind") or "model"),
                      None if not m.get("members") else {str(k): float(v) for k, v in m["members"].items()})
            for m in data["data"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ServerError(f"unexpected models answer: {exc!r}", type="bad_response", endpoint=endpoint) from None


# ---- clients ------------------------------------------------------------------------------------------
class RewardClient(SyncRanking, SyncClient):
    """Blocking HTTP client. `endpoints`: one base URL or several (round-robin with failover).

    Options: model, api_key, timeout (seconds per call, retries included; None: none), max_retries,
    backoff_base, backoff_cap, cooldown_s, max_batch_size; TLS: ca_cert (CA bundle path), client_cert and
    client_key (paths, for mutual TLS), verify; headers (sent on every request); connect_timeout;
    httpx_options (passed to httpx.Client, e.g. limits, proxy, transport, event_hooks).
    """

    def __init__(self, endpoints: str | Sequence[str], *, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None, verify: bool = True,
                 headers: Mapping[str, str] | None = None, connect_timeout: float = 5.0,
                 httpx_options: Mapping[str, Any] | None = None, **options: Any):
        super().__init__(base_urls(endpoints), **options)
        self.connect_timeout = connect_timeout
        verify_with = tls_verify(ca_cert, client_cert, client_key, verify)
        self._http_options = client_options(self.api_key, headers, verify_with, httpx_options)
        self._http = httpx.Client(**self._http_options)
        self._inherited: list[httpx.Client] = []

    def _reopen(self) -> None:
        # the parent's pool (its keep-alive sockets are the parent's too) is kept aside, never used nor closed
        self._inherited.append(self._http)
        self._http = httpx.Client(**self._http_options)

    def _send(self, method: str, endpoint: str, path: str, remaining: float | None, **kw: Any) -> httpx.Response:
        try:
            return self._http.request(method, endpoint + path, timeout=timeout_of(remaining, self.connect_timeout),
                                      **kw)
        except httpx.HTTPError as exc:
            raise transport_error(exc, endpoint) from exc

    def _score_once(self, endpoint: str, remaining: float | None, *, chunk: Sequence[dict], request_id: str,
                    normalize: bool, model: str | None) -> list[ScoreResult]:
        response = self._send("POST", endpoint, "/v1/score", remaining, json=score_body(chunk, normalize, model),
                              headers=request_headers(request_id, remaining))
        return parse_scores(response, endpoint, len(chunk))

    def _models_once(self, endpoint: str, remaining: float | None) -> list[ModelInfo]:
        return parse_models(self._send("GET", endpoint, "/v1/models", remaining), endpoint)

    def _ranked_once(self, endpoint: str, remaining: float | None, *, kind: str, body: dict,
                     request_id: str) -> RankedResult:
        response = self._send("POST", endpoint, f"/v1/{kind}", remaining, json=body,
                              headers=request_headers(request_id, remaining))
        return parse_ranked(answer_json(response, endpoint), endpoint)

    def _probe(self, endpoint: str, ready: bool) -> bool:
        try:
            response = self._http.get(endpoint + ("/ready" if ready else "/health"), timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def close(self) -> None:
        self._closed = True
        self._http.close()


class AsyncRewardClient(AsyncRanking, AsyncClient):
    """asyncio HTTP client; options as for RewardClient, plus max_concurrency (chunks in flight per call, default
    4). It opens one connection pool per event loop, closed when that loop ends: one client may serve several
    `asyncio.run` calls in turn."""

    def __init__(self, endpoints: str | Sequence[str], *, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None, verify: bool = True,
                 headers: Mapping[str, str] | None = None, connect_timeout: float = 5.0,
                 httpx_options: Mapping[str, Any] | None = None, **options: Any):
        super().__init__(base_urls(endpoints), **options)
        self.connect_timeout = connect_timeout
        verify_with = tls_verify(ca_cert, client_cert, client_key, verify)
        http_options = client_options(self.api_key, headers, verify_with, httpx_options)
        self._http = PerLoop(lambda: httpx.AsyncClient(**http_options), httpx.AsyncClient.aclose)

    async def _send(self, method: str, endpoint: str, path: str, remaining: float | None,
                    **kw: Any) -> httpx.Response:
        http = await self._http.get()
        try:
            return await http.request(method, endpoint + path, timeout=timeout_of(remaining, self.connect_timeout),
                                      **kw)
        except httpx.HTTPError as exc:
            raise transport_error(exc, endpoint) from exc

    async def _score_once(self, endpoint: str, remaining: float | None, *, chunk: Sequence[dict],
                          request_id: str, normalize: bool, model: str | None) -> list[ScoreResult]:
        response = await self._send("POST", endpoint, "/v1/score", remaining,
                                    json=score_body(chunk, normalize, model),
                                    headers=request_headers(request_id, remaining))
        return parse_scores(response, endpoint, len(chunk))

    async def _models_once(self, endpoint: str, remaining: float | None) -> list[ModelInfo]:
        return parse_models(await self._send("GET", endpoint, "/v1/models", remaining), endpoint)

    async def _ranked_once(self, endpoint: str, remaining: float | None, *, kind: str, body: dict,
                           request_id: str) -> RankedResult:
        response = await self._send("POST", endpoint, f"/v1/{kind}", remaining, json=body,
                                    headers=request_headers(request_id, remaining))
        return parse_ranked(answer_json(response, endpoint), endpoint)

    async def _probe(self, endpoint: str, ready: bool) -> bool:
        http = await self._http.get()
        try:
            response = await http.get(endpoint + ("/ready" if ready else "/health"), timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        self._closed = True
        await self._http.aclose()
