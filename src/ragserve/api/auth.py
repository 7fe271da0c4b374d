"""API keys: Bearer auth in front of every gateway route, and a private token between gateway and workers.

Keys come from `ragserve serve --api-key K` (repeatable) or RAGSERVE_API_KEYS=k1,k2. With no key set the
server is open, as Xinference and vLLM are by default; `serve` warns when such a server binds a
non-loopback address.

What stays open when keys are set, and why (vLLM and llama.cpp's server draw the same line):
- `/health` answers liveness probes (Docker, systemd, load balancers) that carry no secret; without a
  valid key it says only "ok" and the version, never which models run.
- `/v1/cluster/auth` is how Xinference's client asks whether to send its key at all; it must be
  reachable before the client has authenticated.
Everything else, `/metrics`, `/docs` and `/openapi.json` included, needs `Authorization: Bearer KEY`
(`X-API-Key: KEY` is accepted too, for tools that only set that header).

Keys are compared in constant time: each presented key is hashed and compared against the hash of every
configured key with hmac.compare_digest, so neither the match position nor the key lengths leak.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Optional

from ragserve.api.errors import error_response

API_KEYS_ENV = "RAGSERVE_API_KEYS"
WORKER_TOKEN_ENV = "RAGSERVE_WORKER_TOKEN"
WORKER_TOKEN_HEADER = "x-ragserve-worker-token"
# Gateway -> worker: "end the stream with a usage trailer" (an SSE comment, `: usage {...}`).
USAGE_TRAILER_HEADER = "x-ragserve-usage-trailer"
USAGE_TRAILER_PREFIX = ": usage "
OPEN_PATHS = frozenset({"/health", "/v1/cluster/auth"})


def parse_keys(raw: Optional[str]) -> list[str]:
    return [key.strip() for key in (raw or "").split(",") if key.strip()]


def keys_from_env() -> list[str]:
    return parse_keys(os.environ.get(API_KEYS_ENV))


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class KeyChecker:
    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: Optional[str]) -> bool:
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def presented_key(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """The key a request carries: `Authorization: Bearer K`, else `X-API-Key: K`."""
    api_key_header = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif lowered in (b"x-api-key", b"api-key"):
            api_key_header = value.decode("latin-1").strip() or None
    return api_key_header


class APIKeyMiddleware:
    """Pure ASGI, so it runs before body parsing and does not buffer streamed responses."""

    def __init__(self, app, checker: KeyChecker, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.checker = checker
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.checker.enabled:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers") or [])
        authenticated = self.checker.check(key)
        scope.setdefault("state", {})["authenticated"] = authenticated
        if authenticated or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if key is None:
            message = ("this server requires an API key: send the header `Authorization: Bearer <key>` with one of "
                       "the keys the server was started with (`ragserve serve --api-key` or RAGSERVE_API_KEYS). "
                       "In the OpenAI SDK and LangChain set api_key=...; for the ragserve CLI set RAGSERVE_API_KEY.")
            code = "missing_api_key"
        else:
            message = ("the API key sent is not one of this server's keys: check for a typo or a stale key; the "
                       "keys are those given to `ragserve serve --api-key` or RAGSERVE_API_KEYS.")
            code = "invalid_api_key"
        response = error_response(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="ragserve"'})
        await response(scope, receive, send)


class WorkerTokenMiddleware:
    """Workers listen on loopback, where any local user could reach them; on a shared server that would
    bypass the gateway's keys. The gateway sends a per-run secret that the worker checks; /health stays
    open for the supervisor's readiness polls (it carries no model output)."""

    def __init__(self, app, token: str):
        self.app = app
        self._digest = _digest(token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        sent = None
        for name, value in scope.get("headers") or []:
            if name.lower() == WORKER_TOKEN_HEADER.encode():
                sent = value.decode("latin-1")
        if sent is not None and hmac.compare_digest(_digest(sent), self._digest):
            await self.app(scope, receive, send)
            return
        response = error_response(403, "model workers only answer the ragserve gateway: send requests to the "
                                       "server's address, not to the worker's port", code="forbidden")
        await response(scope, receive, send)
