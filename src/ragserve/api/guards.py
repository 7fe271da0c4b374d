"""Checks every request passes before auth and routing: the path as clients build it, the size of its headers,
and the host name it was sent to. Pure ASGI, so they cost a few microseconds and never buffer a stream."""

from __future__ import annotations

import ipaddress
import os
from typing import Iterable, Optional

from ragserve.api.errors import error_response
from ragserve.api.http_limits import HeaderLimits

ALLOWED_HOSTS_ENV = "RAGSERVE_ALLOWED_HOSTS"
_DOUBLED = "/v1/v1/"


class DoubledPrefixMiddleware:
    """Answers `/v1/v1/...` as `/v1/...`.

    The README gives `http://HOST:PORT/v1` as the base URL, and Xinference clients append `/v1/...` to whatever
    base URL they are given (RAGFlow lists models at `base_url + "/v1/models"`); both forms of base URL must work.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(_DOUBLED):
            scope = dict(scope)
            scope["path"] = scope["path"][3:]
            raw = scope.get("raw_path")
            if raw is not None and raw.startswith(b"/v1/v1/"):
                scope["raw_path"] = raw[3:]
        await self.app(scope, receive, send)


class HeaderLimitMiddleware:
    """431 for headers over the limits of api/http_limits.py, before anything reads them (auth included).

    With `ragserve serve` the HTTP parser already refuses a head over the total limit while it arrives; this
    check makes the per-header limit exact and holds under any ASGI server."""

    def __init__(self, app, limits: HeaderLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = self._problem(scope.get("headers") or [])
            if problem:
                scope.setdefault("state", {})["rejected"] = "header_too_large"
                response = error_response(431, f"{problem}: {self.limits.describe()}",
                                          code="request_header_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, headers: list[tuple[bytes, bytes]]) -> Optional[str]:
        total = 0  # headers only: the request line is bounded by the parser (and the path by routing)
        for name, value in headers:
            size = len(name) + len(value)
            if size > self.limits.line:
                return f"the header {name[:64].decode('latin-1')!r} is {size} bytes"
            total += size + 4  # ": " and CRLF, as sent
        if total > self.limits.total:
            return f"the request headers are {total} bytes"
        return None


def is_loopback_host(host: str) -> bool:
    """Whether a bind address or a Host name means this machine only: localhost, 127.x.x.x, ::1."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a Host header: `name:port` -> name, `[::1]:port` -> ::1."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts_from_env() -> list[str]:
    return [name.strip() for name in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if name.strip()]


class HostCheckMiddleware:
    """A server bound to a loopback address answers only requests sent to a loopback name.

    A web page can point its own DNS name at 127.0.0.1 (DNS rebinding) and then reach a local server from the
    browser; the request then carries the page's name in `Host`. Loopback names, and the names in
    `allowed_hosts` (`--allowed-host`, RAGSERVE_ALLOWED_HOSTS; `*` allows any), are accepted. A request
    without `Host` (HTTP/1.0 tools) is accepted: browsers always send it.

    `bind_host` is the address the server listens on; a non-loopback bind (0.0.0.0 for Docker, whose
    containers call host.docker.internal) is not checked. Without it, the address each connection arrived on
    decides, which is right for a loopback bind and too strict for a wildcard one.
    """

    def __init__(self, app, bind_host: Optional[str], allowed_hosts: Iterable[str]):
        self.app = app
        self.bind_loopback = None if bind_host is None else is_loopback_host(bind_host)
        self.allowed = {host_name(name) for name in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed and self._loopback_only(scope):
            sent = None
            for name, value in scope.get("headers") or []:
                if name == b"host":
                    sent = value.decode("latin-1")
                    break
            if sent is not None and not self._accepted(sent):
                scope.setdefault("state", {})["rejected"] = "host"
                await self._refuse(sent, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _loopback_only(self, scope) -> bool:
        if self.bind_loopback is not None:
            return self.bind_loopback
        server = scope.get("server")
        return bool(server) and is_loopback_host(str(server[0]))

    def _accepted(self, header: str) -> bool:
        name = host_name(header)
        return is_loopback_host(name) or name in self.allowed

    async def _refuse(self, sent: str, scope, receive, send) -> None:
        shown = sent[:100].encode("ascii", "backslashreplace").decode()
        message = (f"this server listens on a loopback address and answers only requests sent to localhost, "
                   f"127.0.0.1 or [::1], not to {shown!r} (a web page may be reaching it through DNS "
                   f"rebinding). To reach it by that name, start it with --allowed-host NAME or "
                   f"{ALLOWED_HOSTS_ENV}=name1,name2")
        response = error_response(421, message, code="host_not_allowed")
        await response(scope, receive, send)
