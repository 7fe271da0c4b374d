"""Bounded request heads: a request line plus headers above RAGSERVE_MAX_HEADER_KB is refused with 431.

The bound is kept in two places. The HTTP parser (uvicorn's httptools protocol, subclassed here) counts the
bytes of a request head as they arrive and answers 431 as soon as the head passes the limit, so an endless
header costs the gateway a few kilobytes, not its size: uvicorn's own parser buffers any header whole.
`HeaderLimitMiddleware` (api/guards.py) checks the parsed headers again, line by line, for servers started
without this protocol.

`ragserve serve` passes `uvicorn_options()` to uvicorn.run.
"""

from __future__ import annotations

import json
import os
from typing import Any

MAX_HEADER_ENV = "RAGSERVE_MAX_HEADER_KB"
DEFAULT_MAX_HEADER_KB = 64
MIN_LINE_LIMIT = 16 * 1024
# The parser is fed at most this much at a time while a head is open, so it overshoots the limit by no more.
_FEED_PIECE = 8 * 1024


class HeaderLimits:
    """`total`: bytes of request line and headers together; `line`: bytes of one header (name and value),
    a quarter of the total but at least 16 KiB (or the total, when that is smaller)."""

    def __init__(self, total: int):
        self.total = total
        self.line = min(total, max(MIN_LINE_LIMIT, total // 4))

    @classmethod
    def from_env(cls) -> "HeaderLimits":
        raw = os.environ.get(MAX_HEADER_ENV, "").strip()
        if not raw:
            return cls(DEFAULT_MAX_HEADER_KB * 1024)
        try:
            kib = float(raw)
        except ValueError:
            kib = float("nan")
        if not 1 <= kib <= 1024 * 1024:  # also refuses nan
            raise ValueError(f"{MAX_HEADER_ENV}={raw!r} must be a number of KiB from 1 to 1048576 "
                             f"(default {DEFAULT_MAX_HEADER_KB})")
        return cls(int(kib * 1024))

    def describe(self) -> str:
        return (f"this server accepts request headers of at most {self.total} bytes in all and {self.line} bytes "
                f"for one header ({MAX_HEADER_ENV}); send smaller headers (a key or token of normal size)")


def too_large_body(limits: HeaderLimits, what: str) -> bytes:
    """The 431 answer in the OpenAI error shape (api/errors.py error_body, written without FastAPI)."""
    message = f"{what}: {limits.describe()}"
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_header_too_large"}, "detail": message}).encode()


def _bounded_httptools_protocol():
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadTooLarge(Exception):
        pass

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with the request head counted while it arrives."""

        limits = HeaderLimits(DEFAULT_MAX_HEADER_KB * 1024)

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._in_body = False  # between a head's end and its message's end; the rest of the time is head
            self._head_bytes = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(name) + len(value) > self.limits.line:
                raise HeadTooLarge(f"the header {name[:64].decode('latin-1')!r} is {len(name) + len(value)} bytes")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_body = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body = False
            self._head_bytes = 0
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            view = memoryview(data) if len(data) > _FEED_PIECE else data
            start = 0
            while start < len(data):
                if self._in_body:  # body bytes are bounded elsewhere (api/app.py RequestLimitMiddleware)
                    self._feed(view[start:])
                    return
                piece = view[start:start + _FEED_PIECE]
                start += _FEED_PIECE
                if not self._feed(piece):
                    return
                if not self._in_body:
                    self._head_bytes += len(piece)
                    if self._head_bytes > self.limits.total:
                        self._refuse(f"the request head passed {self.limits.total} bytes")
                        return

        def _feed(self, data) -> bool:
            """Feed the parser as uvicorn does; False once the connection is answered and closing."""
            if self.parser is None or self.transport.is_closing():
                return False
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                if not isinstance(exc.__context__, HeadTooLarge):
                    raise
                self._refuse(str(exc.__context__))
                return False
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return False
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            return True

        def _refuse(self, what: str) -> None:
            body = too_large_body(self.limits, what)
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                                 + body)
            self.transport.close()

    return BoundedHttpToolsProtocol


def uvicorn_options(limits: HeaderLimits | None = None) -> dict[str, Any]:
    """Keyword arguments for uvicorn.run / uvicorn.Config that bound request heads to `limits`
    (RAGSERVE_MAX_HEADER_KB when not given)."""
    limits = limits or HeaderLimits.from_env()
    try:
        protocol = _bounded_httptools_protocol()
    except ImportError:  # no httptools: uvicorn's h11 parser has a bound of its own (it answers 400, not 431)
        return {"http": "h11", "h11_max_incomplete_event_size": limits.total}
    protocol = type(protocol.__name__, (protocol,), {"limits": limits})
    return {"http": protocol, "h11_max_incomplete_event_size": limits.total}
