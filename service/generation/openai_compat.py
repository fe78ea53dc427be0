"""A remote OpenAI-compatible server as the generator (vLLM's `/v1/chat/completions` and `/v1/completions`).

Chat completions by default: the remote server renders the conversation with the policy's own chat template.
A policy without one (the server answers 400 naming the chat template) is asked through `/v1/completions`
with the plain dialogue format instead, from then on. The model is the server's first in GET /v1/models.
An API key for the remote server comes from REWARDSERVE_GENERATOR_API_KEY.

Errors: no answer or a 5xx -> GENERATOR (HTTP 502); the remote's 400/422 -> INVALID_ARGUMENT with its
message; the deadline passing -> DEADLINE (504).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx

from service.errors import ErrorKind, RewardServeError
from service.generation.base import (
    Generation, Messages, Sampling, deadline_error, generator_error, remaining_s,
)
from rewardmodel.rendering import render_plain

log = logging.getLogger("rewardserve.generation")

CONNECT_TIMEOUT_S = 5.0
MODELS_TIMEOUT_S = 10.0


def base_url(target: str) -> str:
    url = target.rstrip("/")
    return url.removesuffix("/v1")


class OpenAIGenerator:
    def __init__(self, target: str, config: Any, *, api: str = "chat", model: str | None = None):
        if not target.startswith(("http://", "https://")):
            raise ValueError(f"generator openai:{target}: the target must be an http(s):// URL")
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.url = base_url(target)
        self.name = f"openai:{self.url}"
        self.api = api
        self.model = model
        key = os.environ.get("REWARDSERVE_GENERATOR_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self._headers)
            self._loop = asyncio.get_running_loop()
        return self._client

    async def start(self) -> None:
        """Learn the model name now if the server answers; otherwise at the first request (it may start later)."""
        try:
            await self._model()
        except RewardServeError as exc:
            log.warning("%s: %s (will retry at the first request)", self.name, exc.message)

    async def _model(self, deadline: float | None = None) -> str:
        if self.model is None:
            left = remaining_s(deadline)
            timeout = MODELS_TIMEOUT_S if left is None else min(MODELS_TIMEOUT_S, left)
            body = await self._send("GET", "/v1/models", None, timeout)
            try:
                self.model = str(body["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise generator_error(self.name, f"GET /v1/models lists no model: {str(body)[:200]}") from None
        return self.model

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:  # on the client's own loop, from whatever thread closes
            asyncio.run_coroutine_threadsafe(client.aclose(), self._loop)
        except RuntimeError:  # that loop is closed: so are its connections
            pass

    # ---- generation ------------------------------------------------------------------------------------
    async def generate(self, messages: Messages, sampling: Sampling, deadline: float | None = None) -> list[Generation]:
        model = await self._model(deadline)
        if self.api == "chat":
            try:
                payload = {"messages": list(messages)}
                return await self._request("/v1/chat/completions", payload, model, sampling, deadline)
            except RewardServeError as exc:
                if exc.kind != ErrorKind.INVALID_ARGUMENT or "chat template" not in exc.message:
                    raise
                log.info("%s: the policy has no chat template; using /v1/completions", self.name)
                self.api = "completions"
        prompt = render_plain(messages) + "\n\nAssistant:"
        return await self._request("/v1/completions", {"prompt": prompt}, model, sampling, deadline)

    async def _request(self, path: str, payload: dict, model: str, sampling: Sampling,
                       deadline: float | None) -> list[Generation]:
        body = {
            "model": model, **payload, "n": sampling.n, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.engine_seed
        answer = await self._send("POST", path, body, remaining_s(deadline), deadline)
        return self._parse(answer, sampling.n, chat=path.endswith("chat/completions"))

    async def _send(self, method: str, path: str, body: dict | None, timeout: float | None,
                    deadline: float | None = None) -> Any:
        limit = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout) if timeout else CONNECT_TIMEOUT_S)
        try:
            response = await self._http().request(method, self.url + path, json=body, timeout=limit)
        except httpx.TimeoutException as exc:
            if deadline is not None:
                raise deadline_error() from None
            raise generator_error(self.name, f"{method} {path} timed out: {exc!r}") from None
        except httpx.HTTPError as exc:
            raise generator_error(self.name, f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code in (400, 422):
            raise RewardServeError(
                ErrorKind.INVALID_ARGUMENT, f"the generator rejected the request: {_message(response)}"
            )
        if response.status_code != 200:
            raise generator_error(self.name, f"{method} {path} answered {response.status_code}: {_message(response)}")
        try:
            return response.json()
        except ValueError:
            raise generator_error(self.name, f"{method} {path} answered with something else than JSON") from None

    def _parse(self, answer: Any, n: int, chat: bool) -> list[Generation]:
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            texts = [c["message"]["content"] if chat else c["text"] for c in choices]
            reasons = [c.get("finish_reason") or "length" for c in choices]
        except (KeyError, TypeError) as exc:
            raise generator_error(self.name, f"unexpected answer (missing {exc}): {str(answer)[:200]}") from None
        if len(texts) != n:
            raise generator_error(self.name, f"asked for {n} choices, got {len(texts)}")
        return [Generation(t or "", r) for t, r in zip(texts, reasons)]


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body)[:300]
