"""A lean path for the few POST routes that carry the traffic (embeddings, rerank, chat).

FastAPI's routing, dependency solving and exception layers cost around a millisecond a request
on a small CPU: more than the whole engine time of a one-sentence embedding. This ASGI layer
answers those routes itself, with the same pydantic schemas and the same error shapes, and passes
everything else to the FastAPI app (which keeps the routes too, for /docs and the OpenAPI schema).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Optional, Union

from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from ragserve.api.errors import APIError, describe_validation_errors, error_response

log = logging.getLogger("ragserve")

# handler(validated body, raw body bytes, ASGI scope) -> a JSON-able dict or a ready Response
Handler = Callable[[Any, bytes, dict], Awaitable[Union[dict, Response]]]


class RouteLabel:
    """What middlewares read from scope["route"] (its path), as FastAPI's routes would leave it."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path


class FastJSONRoutes:
    """Pure ASGI: `routes` maps a POST path to (request schema, handler); other requests go to `app`."""

    def __init__(self, app, routes: dict[str, tuple[type[BaseModel], Handler]]):
        self.app = app
        self.routes = {path: (schema, handler, RouteLabel(path)) for path, (schema, handler) in routes.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        schema, handler, label = self.routes[scope["path"]]
        scope["route"] = label
        response = await self._answer(schema, handler, scope, receive)
        await response(scope, receive, send)

    async def _answer(self, schema: type[BaseModel], handler: Handler, scope, receive) -> Response:
        raw = await _read_body(receive)
        if raw is None:
            return Response(status_code=499)  # the client left while sending; nobody reads this
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as exc:
            message, param = describe_validation_errors(exc.errors(include_url=False))
            return error_response(400, message, "invalid_request", param)
        try:
            result = await _unless_disconnected(receive, handler(body, raw, scope))
        except _ClientGone:
            log.info("POST %s: the client hung up; its work is dropped", scope["path"])
            return Response(status_code=499)  # nobody reads it
        except APIError as exc:
            return error_response(exc.status_code, exc.message, exc.code, exc.param, exc.headers)
        except Exception as exc:
            log.exception("unexpected error on POST %s", scope["path"])
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}. "
                                       "This is a bug; the server log has the traceback.")
        if isinstance(result, Response):
            return result
        return JSONBytesResponse(result)


class _ClientGone(Exception):
    pass


async def _unless_disconnected(receive, work: Awaitable[Any]) -> Any:
    """Await `work` (the body is already read) while the client stays connected; cancel it if it leaves.

    Cancelling the gateway's forward() makes aiohttp close its connection to the worker, which is how the
    worker learns that nobody waits for the answer and drops the work (workers/worker.py). The work runs in
    this task (no second task per request on the hot path); a watcher task cancels it on disconnect."""
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here, not by the caller
            task.uncancel()
        raise _ClientGone() from None
    finally:
        watcher.cancel()


class JSONBytesResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


async def _read_body(receive) -> Optional[bytes]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
