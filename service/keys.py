"""API keys, transport-free: which keys are valid, compared in constant time.

When keys are configured, every route needs one except the open ones (by default /health, /ready and /metrics
over HTTP, and the gRPC health and reflection services). HTTP checks them in service/http_api/auth.py
(`Authorization: Bearer <key>`), gRPC in service/grpc_api/auth.py (metadata `authorization: Bearer <key>`).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Iterable


class KeyChecker:
    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | bytes | None) -> bool:
        """True for `Bearer <one of the keys>`; every key is compared, in constant time."""
        if authorization is None:
            return False
        value = authorization if isinstance(authorization, bytes) else authorization.encode()
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        return any([hmac.compare_digest(token, key) for key in self._keys])


def load_keys(inline: Iterable[str], key_file: str | None) -> list[str]:
    """Keys from the config (flag/env, comma-separated) and from a file (one per line, # comments)."""
    keys = [k.strip() for k in inline if k.strip()]
    if key_file:
        found = [line.split("#", 1)[0].strip() for line in Path(key_file).read_text().splitlines()]
        found = [key for key in found if key]
        if not found:  # an emptied key file must not turn authentication off
            raise ValueError(f"api_key_file {key_file} holds no key: add keys (one per line), or drop the setting "
                             "to serve without authentication")
        keys += found
    return keys


def key_checker(config: Any) -> KeyChecker:
    return KeyChecker(load_keys(config.api_keys, config.api_key_file))
