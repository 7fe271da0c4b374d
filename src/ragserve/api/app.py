"""The gateway: validates requests, routes them to the model's worker, and manages models.

It never runs a model itself, so it starts in well under a second and stays small.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ragserve import __version__
from ragserve.api.auth import (USAGE_TRAILER_HEADER, USAGE_TRAILER_PREFIX, WORKER_TOKEN_HEADER,
                               APIKeyMiddleware, KeyChecker, keys_from_env)
from ragserve.api.fast_routes import FastJSONRoutes
from ragserve.api.guards import (DoubledPrefixMiddleware, HeaderLimitMiddleware, HostCheckMiddleware,
                                 allowed_hosts_from_env)
from ragserve.api.http_limits import HeaderLimits
from ragserve.api.logsafe import install_log_escaping
from ragserve.api.errors import APIError, error_response, install_error_handlers, model_not_found
from ragserve.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ragserve.api.metrics import GatewayMetrics, ObserveMiddleware, usage_from_json
from ragserve.api.xinference_routes import install_xinference_routes, launch_options
from ragserve.api.schemas import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, LaunchRequest,
                                  RerankRequest)
from ragserve.control.resolve import LaunchError, build_spec
from ragserve.control.spec import ModelSpec, ModelState, ModelType
from ragserve.control.supervisor import ModelRecord, Supervisor
from ragserve.settings import Home

log = logging.getLogger("ragserve")

_ROUTE_TYPES = {
    "/v1/chat/completions": ModelType.LLM,
    "/v1/completions": ModelType.LLM,
    "/v1/embeddings": ModelType.EMBEDDING,
    "/v1/rerank": ModelType.RERANK,
}
_ROUTE_HINT = {ModelType.LLM: "/v1/chat/completions", ModelType.EMBEDDING: "/v1/embeddings",
               ModelType.RERANK: "/v1/rerank"}

# Bounds that hold before any model work, so overload costs memory in proportion to these and no more.
MAX_BODY_BYTES = int(float(os.environ.get("RAGSERVE_MAX_BODY_MB", "32")) * 1024 * 1024)
MAX_IN_FLIGHT = int(os.environ.get("RAGSERVE_MAX_IN_FLIGHT", "1024"))
USAGE_TRAILER_PREFIX_BYTES = USAGE_TRAILER_PREFIX.encode()
_UNLIMITED_PATHS = frozenset({"/health", "/metrics", "/v1/cluster/auth"})


class RequestLimitMiddleware:
    """Refuses a body over MAX_BODY_BYTES (413) before reading it, and requests beyond MAX_IN_FLIGHT (503
    with Retry-After) before they queue anywhere. Pure ASGI: streamed responses pass through unbuffered."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, max_in_flight: int = MAX_IN_FLIGHT):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.in_flight >= self.max_in_flight:
            state["rejected"] = "overloaded"
            response = error_response(503, f"the server is answering {self.in_flight} requests, its limit "
                                           f"(RAGSERVE_MAX_IN_FLIGHT={self.max_in_flight}); retry after a second",
                                      code="server_overloaded", headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            state["rejected"] = "too_large"
            await self._too_large(int(declared), scope, receive, send)
            return
        self.in_flight += 1
        try:
            if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # A chunked body has no declared size: read it here, stopping at the limit.
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                    if size > self.max_body_bytes:
                        state["rejected"] = "too_large"
                        await self._too_large(size, scope, receive, send)
                        return
                body = b"".join(chunks)
                delivered = False

                async def replay():
                    nonlocal delivered
                    if not delivered:
                        delivered = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _too_large(self, size: int, scope, receive, send) -> None:
        limit_mb = self.max_body_bytes / (1024 * 1024)
        response = error_response(413, f"the request body is {size} bytes; this server accepts at most "
                                       f"{self.max_body_bytes} ({limit_mb:g} MiB, RAGSERVE_MAX_BODY_MB): split the "
                                       f"input into several requests", code="request_too_large")
        await response(scope, receive, send)


def model_description(record: ModelRecord) -> dict[str, Any]:
    """One model in Xinference's describe shape, plus OpenAI's list fields and our state."""
    spec = record.spec
    return {
        "id": spec.uid,
        "object": "model",
        "created": int(record.launched_at),
        "owned_by": "ragserve",
        "model_uid": spec.uid,
        "model_name": spec.model_name,
        "model_type": spec.model_type.value,
        "model_engine": spec.model_engine,
        "model_format": spec.model_format,
        "model_path": spec.model_path,
        "model_size_in_billions": spec.size_in_billions,
        "quantization": spec.quantization,
        "model_ability": {ModelType.LLM: ["chat", "generate"], ModelType.EMBEDDING: ["embed"],
                          ModelType.RERANK: ["rerank"]}[spec.model_type],
        "context_length": record.info.get("context_length") or spec.n_ctx,
        "dimensions": record.info.get("dimensions"),
        **_max_tokens(record),
        "state": record.state.value,
        "error": record.error,
        "restarts": record.restarts,
        "replica": 1,
        "address": record.base_url if record.port else None,
        "info": record.info,
        "options": spec.options,  # launch options as given, e.g. demo_only (read by `ragserve check`)
    }


def _max_tokens(record: ModelRecord) -> dict[str, int]:
    """Xinference describes an embedding model with `max_tokens`, the longest input it embeds whole; Dify's
    Xinference plugin reads it (and assumes 512 without it). Told only once the worker has reported it."""
    if record.spec.model_type != ModelType.EMBEDDING:
        return {}
    limit = record.info.get("context_length") or record.spec.n_ctx
    return {"max_tokens": int(limit)} if limit else {}


def create_app(home: Home, *, relaunch_saved: bool = True, api_keys: Optional[list[str]] = None,
               bind_host: Optional[str] = None, allowed_hosts: Optional[list[str]] = None) -> FastAPI:
    """The gateway app. `bind_host` is the address the server listens on: on a loopback address only
    loopback host names (and `allowed_hosts`, else RAGSERVE_ALLOWED_HOSTS) are answered (api/guards.py)."""
    install_log_escaping()
    header_limits = HeaderLimits.from_env()
    supervisor = Supervisor(home)
    checker = KeyChecker(keys_from_env() if api_keys is None else api_keys)
    metrics = GatewayMetrics(lambda: [{"uid": uid, "state": r.state.value, "restarts": r.restarts,
                                       "queue_depth": queue_depths.get(uid)}
                                      for uid, r in supervisor.records.items()])
    queue_depths: dict[str, Optional[int]] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        supervisor.start()
        # Import the worker hop's client off the event loop, once the server already answers, rather than
        # in the first request.
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, lambda: loop.run_in_executor(None, _aiohttp))
        if relaunch_saved:
            for spec in supervisor.saved_specs():
                log.info("relaunching %s from the last run", spec.uid)
                asyncio.create_task(_relaunch(spec))
        try:
            yield
        finally:
            await supervisor.shutdown()
            session = getattr(app.state, "worker_session", None)
            if session is not None:
                await session.close()

    async def _relaunch(spec: ModelSpec) -> None:
        try:
            await supervisor.launch(spec, wait_ready=False)
        except Exception as exc:
            log.error("relaunching %s failed: %s", spec.uid, exc)

    app = FastAPI(title="ragserve", version=__version__, lifespan=lifespan,
                  description="OpenAI- and Xinference-compatible serving of chat, embedding and rerank models.")
    app.state.supervisor = supervisor
    # Streams being relayed, and those the shutdown drain cut: `ragserve serve` calls cut_streams() just before
    # uvicorn's drain deadline, so a client sees an error event and [DONE], not a connection dropped mid-stream.
    live_streams: set = set()
    cut_streams: set = set()

    def cut_all_streams() -> None:
        for upstream in list(live_streams):
            cut_streams.add(upstream)
            upstream.close()

    app.state.cut_streams = cut_all_streams
    app.state.home = home
    app.state.metrics = metrics
    install_error_handlers(app)

    # ---- model lookup -----------------------------------------------------------------------

    def find_record(name: str) -> ModelRecord:
        record = supervisor.records.get(name)
        if record is None:
            for candidate in supervisor.records.values():
                if candidate.spec.model_name == name:
                    record = candidate
                    break
        if record is None:
            raise model_not_found(name, list(supervisor.records))
        return record

    def routable(name: str, route: str) -> ModelRecord:
        record = find_record(name)
        wanted = _ROUTE_TYPES[route]
        if record.spec.model_type != wanted:
            raise APIError(400, f"model {name!r} is a {record.spec.model_type.value} model; {route} needs a "
                                f"{wanted.value} model. Send it to {_ROUTE_HINT[record.spec.model_type]} instead.",
                           code="wrong_model_type", param="model")
        if record.state == ModelState.FAILED:
            raise APIError(503, f"model {name!r} failed: {record.error}. Fix the cause, then terminate and launch "
                                f"it again.", code="model_failed")
        if record.state != ModelState.READY:
            raise APIError(503, f"model {name!r} is {record.state.value}; retry in a moment",
                           code="model_not_ready", headers={"Retry-After": "2"})
        return record

    # ---- forwarding --------------------------------------------------------------------------

    async def forward(record: ModelRecord, route: str, raw_body: bytes, stream: bool,
                      state: dict[str, Any]) -> Response:
        """Send the request to the model's worker and relay the answer, noting token usage in `state`.

        A stream is relayed as it comes; the worker ends it with a usage trailer (an SSE comment) that is
        read and taken out here, so the client gets exactly the stream it asked for.
        """
        url = f"{record.base_url}{route}"
        headers = {"content-type": "application/json", WORKER_TOKEN_HEADER: supervisor.worker_token}
        if stream:
            headers[USAGE_TRAILER_HEADER] = "1"
        # A frozen worker must not hold a request forever (control/supervisor.py WorkerTimeouts): a stream is
        # bounded between events, any other answer by its first byte.
        limits = supervisor.timeouts
        read_limit, limit_env = ((limits.stream_idle, "RAGSERVE_WORKER_STREAM_IDLE_TIMEOUT") if stream else
                                 (limits.first_byte, "RAGSERVE_WORKER_FIRST_BYTE_TIMEOUT"))

        def timed_out(exc: Exception) -> APIError:
            connecting = isinstance(exc, _aiohttp().ConnectionTimeoutError)
            seconds, env = (limits.connect, "RAGSERVE_WORKER_CONNECT_TIMEOUT") if connecting else (read_limit,
                                                                                                    limit_env)
            return APIError(504, f"model {record.spec.uid!r} did not answer: its worker sent nothing for {seconds:g} s "
                                 f"({env}). It is busy or frozen; a worker that stops answering its health checks is "
                                 f"restarted automatically. Retry later; if this repeats, see "
                                 f"{supervisor.home.worker_log(record.spec.uid)}",
                            code="worker_unavailable", headers={"Retry-After": "2"})

        try:
            # The session's own timeout bounds the first byte; a stream gets its idle bound instead.
            bound = {"timeout": _aiohttp().ClientTimeout(total=None, sock_connect=limits.connect,
                                                         sock_read=read_limit)} if stream else {}
            upstream = await worker_session().post(url, data=raw_body, headers=headers, **bound)
            if not stream or upstream.status != 200:
                async with upstream:
                    content = await upstream.read()
                if upstream.status == 200:
                    state["usage"] = usage_from_json(content)
                return Response(content, status_code=upstream.status,
                                media_type=upstream.headers.get("content-type", "application/json"),
                                headers=_retry_after(upstream.headers))
        except asyncio.TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors (and ClientErrors)
            raise timed_out(exc) from exc
        except _aiohttp().ClientError as exc:
            raise await _worker_lost(record, exc) from exc

        async def relay():
            pending = b""
            finished = False
            live_streams.add(upstream)
            try:
                async for piece in upstream.content.iter_any():
                    pending += piece
                    cut = pending.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    events, pending = pending[:cut + 2], pending[cut + 2:]
                    if b'"usage"' in events:
                        events = _take_stream_usage(events, state)
                    if events:
                        yield events
                if upstream in cut_streams:
                    yield _shutting_down_events()
                    return
                if pending:
                    yield pending
                finished = True
            except (_aiohttp().ClientError, asyncio.TimeoutError) as exc:
                if upstream in cut_streams:
                    yield _shutting_down_events()
                    return
                lost = timed_out(exc) if isinstance(exc, asyncio.TimeoutError) else await _worker_lost(record, exc)
                error = {"error": {"message": lost.message, "type": "service_unavailable", "param": None,
                                   "code": lost.code}}
                yield f"data: {json.dumps(error)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                live_streams.discard(upstream)
                cut_streams.discard(upstream)
                # A stream cut short closes its connection: that is how the worker learns the client left.
                upstream.release() if finished else upstream.close()

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def worker_session() -> "aiohttp.ClientSession":
        # aiohttp rather than httpx for this hop: its pool and C parser cost a fraction of httpx's per
        # request, which is most of what a gateway adds to a small embedding request.
        session = getattr(app.state, "worker_session", None)
        if session is None or session.closed:
            aiohttp = _aiohttp()
            # Idle connections close after 60 s, before the worker's own 120 s (workers/worker.py).
            connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, limit_per_host=0, keepalive_timeout=60,
                                             enable_cleanup_closed=False)
            session = app.state.worker_session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=supervisor.timeouts.connect,
                                              sock_read=supervisor.timeouts.first_byte))
        return session

    async def _worker_lost(record: ModelRecord, exc: Exception) -> APIError:
        cause = await supervisor.exit_cause(record)
        what = f"its worker {cause}" if cause else f"its worker stopped answering ({type(exc).__name__}: {exc})"
        return APIError(503, f"model {record.spec.uid!r} could not answer: {what}. The worker is restarted "
                             f"automatically; retry in a few seconds. If this repeats, see "
                             f"{supervisor.home.worker_log(record.spec.uid)}",
                        code="worker_unavailable", headers={"Retry-After": "2"})

    extras_logged: set[tuple[str, str]] = set()

    def log_extra_fields(uid: str, body: Any) -> None:
        """Fields no schema here knows are not used: say so once per model and name (clients send many
        vendor extras, so they are not refused; those that would change the answer are, in api/schemas.py)."""
        new = [name for name in (getattr(body, "model_extra", None) or {}) if (uid, name) not in extras_logged]
        if new:
            extras_logged.update((uid, name) for name in new)
            log.info("model %s: requests carry fields this server does not use (ignored): %s", uid,
                     ", ".join(sorted(new)))

    async def serve_route(route: str, body: Any, raw_body: bytes, scope: dict) -> Response:
        record = routable(body.model, route)
        state = scope.setdefault("state", {})
        state["model"] = record.spec.uid
        log_extra_fields(record.spec.uid, body)
        stream = bool(getattr(body, "stream", False))
        if stream:
            state["stream"] = True
        return await forward(record, route, raw_body, stream, state)

    async def chat_completions(body: ChatCompletionRequest, raw_body: bytes, scope: dict) -> Response:
        return await serve_route("/v1/chat/completions", body, raw_body, scope)

    async def completions(body: CompletionRequest, raw_body: bytes, scope: dict) -> Response:
        return await serve_route("/v1/completions", body, raw_body, scope)

    async def embeddings(body: EmbeddingRequest, raw_body: bytes, scope: dict) -> Response:
        return await serve_route("/v1/embeddings", body, raw_body, scope)

    async def rerank(body: RerankRequest, raw_body: bytes, scope: dict) -> Response:
        record = routable(body.model, "/v1/rerank")
        scope.setdefault("state", {})["model"] = record.spec.uid
        # Forward the validated body: Cohere/Jina/TEI shapes are normalised here.
        payload = body.model_dump_json(exclude_none=True).encode()
        return await forward(record, "/v1/rerank", payload, False, scope["state"])

    # ---- OpenAI routes -----------------------------------------------------------------------
    # Answered by FastJSONRoutes (api/fast_routes.py) without FastAPI's per-request layers; the FastAPI
    # routes below run the same handlers and give /docs and the OpenAPI schema.

    hot_routes = {"/v1/chat/completions": (ChatCompletionRequest, chat_completions),
                  "/v1/completions": (CompletionRequest, completions),
                  "/v1/embeddings": (EmbeddingRequest, embeddings),
                  "/v1/rerank": (RerankRequest, rerank),
                  "/rerank": (RerankRequest, rerank),
                  "/v2/rerank": (RerankRequest, rerank)}

    # Last added runs first: `/v1/v1/...` becomes `/v1/...` before anything reads the path; observe everything
    # (431s, 421s, 401s and 413s too); bound the headers, then check the host name and the key before reading
    # a body; the hot routes answer innermost, after every check.
    app.add_middleware(FastJSONRoutes, routes=hot_routes)
    app.add_middleware(RequestLimitMiddleware)
    app.add_middleware(APIKeyMiddleware, checker=checker)
    app.add_middleware(HostCheckMiddleware, bind_host=bind_host,
                       allowed_hosts=allowed_hosts_from_env() if allowed_hosts is None else allowed_hosts)
    app.add_middleware(HeaderLimitMiddleware, limits=header_limits)
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    app.add_middleware(DoubledPrefixMiddleware)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions_route(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completions(body, await request.body(), request.scope)

    @app.post("/v1/completions", tags=["openai"])
    async def completions_route(body: CompletionRequest, request: Request) -> Response:
        return await completions(body, await request.body(), request.scope)

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings_route(body: EmbeddingRequest, request: Request) -> Response:
        return await embeddings(body, await request.body(), request.scope)

    @app.post("/v1/rerank", tags=["rerank"])
    @app.post("/rerank", tags=["rerank"], include_in_schema=False)
    @app.post("/v2/rerank", tags=["rerank"], include_in_schema=False)
    async def rerank_route(body: RerankRequest, request: Request) -> Response:
        return await rerank(body, b"", request.scope)

    # ---- model management (OpenAI list + Xinference launch/describe/terminate) ---------------

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_description(r) for r in supervisor.records.values()]}

    @app.get("/v1/models/{model_uid}", tags=["models"])
    async def describe_model(model_uid: str) -> dict[str, Any]:
        return model_description(find_record(model_uid))

    @app.post("/v1/models", tags=["models"])
    async def launch_model(body: LaunchRequest,
                           wait_ready: Optional[bool] = Query(None, description="Xinference's client sends "
                                                                                "it as a query parameter")
                           ) -> JSONResponse:
        if wait_ready is not None:
            body.wait_ready = wait_ready
        try:
            size = body.size_b()
        except ValueError as exc:
            raise APIError(400, str(exc), param="size_in_billions") from exc
        options = launch_options(body.options, body.model_extra or {})
        model_path = body.model_path
        if model_path and _is_hub_id(model_path):
            model_path = await _pull(model_path, body, home)
        try:
            spec = await asyncio.to_thread(
                build_spec, uid=body.model_uid, model_name=body.model_name, model_type=body.model_type,
                model_engine=body.model_engine, model_path=model_path, model_format=body.model_format,
                quantization=body.quantization, size_in_billions=size, n_ctx=body.n_ctx,
                n_parallel=body.n_parallel, options=options)
        except LaunchError as exc:
            raise APIError(400, str(exc), code="invalid_launch") from exc
        existing = supervisor.records.get(spec.uid)
        if existing is not None and existing.state != ModelState.FAILED:
            raise APIError(409, f"a model with uid {spec.uid!r} is already {existing.state.value}: terminate it "
                                f"first or choose another --model-uid", code="model_exists", param="model_uid")
        await _check_memory(spec, body.force)
        record = await _launch_or_forget(spec, body.wait_ready)
        if record.state == ModelState.FAILED:
            raise APIError(500, f"model {spec.uid!r} failed to load: {record.error}", code="load_failed")
        return JSONResponse({"model_uid": spec.uid, "state": record.state.value})

    async def _launch_or_forget(spec: ModelSpec, wait_ready: bool) -> ModelRecord:
        """supervisor.launch, leaving no record behind when it raises: a record it made before failing would
        stay `loading` for ever (terminate says 404 to its name, launch 409)."""
        before = supervisor.records.get(spec.uid)
        try:
            return await supervisor.launch(spec, wait_ready=wait_ready)
        except Exception as exc:
            left = supervisor.records.get(spec.uid)
            if left is not None and left is not before:
                await supervisor.terminate(spec.uid)
            if isinstance(exc, ValueError):  # the supervisor's refusals name their cause and fix
                raise APIError(400, str(exc), code="invalid_launch") from exc
            log.exception("launching %s failed", spec.uid)
            raise APIError(500, f"could not start a worker for {spec.uid!r}: {type(exc).__name__}: {exc}. "
                                f"The server log has the traceback.", code="launch_failed") from exc

    @app.delete("/v1/models/{model_uid}", tags=["models"])
    async def terminate_model(model_uid: str) -> dict[str, Any]:
        record = find_record(model_uid)
        await supervisor.terminate(record.spec.uid)
        return {"model_uid": record.spec.uid, "terminated": True}

    @app.get("/health", tags=["server"])
    async def health(request: Request) -> dict[str, Any]:
        # Open to probes without a key (see api/auth.py); which models run is told only with a key.
        if checker.enabled and not request.scope.get("state", {}).get("authenticated"):
            return {"status": "ok", "version": __version__}
        states = {uid: r.state.value for uid, r in supervisor.records.items()}
        return {"status": "ok", "version": __version__, "models": states}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latency, tokens, queue depth per model, worker restarts."""
        queue_depths.clear()
        queue_depths.update(await supervisor.queue_depths())
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    install_xinference_routes(app, supervisor, checker, find_record)
    return app


def _aiohttp():
    """aiohttp, imported on first use: a quarter second less before the server answers /health."""
    import aiohttp

    return aiohttp


def _shutting_down_events() -> bytes:
    error = {"error": {"message": "the server is shutting down and its drain time ran out before this stream "
                                  "ended (RAGSERVE_DRAIN_TIMEOUT); retry on the restarted server",
                       "type": "service_unavailable", "param": None, "code": "server_shutting_down"}}
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


def _retry_after(headers) -> dict[str, str]:
    value = headers.get("retry-after")
    return {"Retry-After": value} if value else {}


def _take_stream_usage(events: bytes, state: dict[str, Any]) -> bytes:
    """Note the usage in these SSE events (the client's usage chunk or the worker's trailer, both
    `{"usage": {...}}`); drop the trailer, keep everything else."""
    kept = []
    for event in events.split(b"\n\n")[:-1]:
        usage = usage_from_json(event) if b'"usage"' in event else None
        if usage is not None:
            state["usage"] = usage
        if not event.startswith(USAGE_TRAILER_PREFIX_BYTES):
            kept.append(event + b"\n\n")
    return b"".join(kept)


def _is_hub_id(text: str) -> bool:
    # ragserve.hub imports only the standard library at its top: an ImportError here is a broken install, not
    # "not a hub ID" (that fallback would launch a hub ID as a missing local path).
    from ragserve.hub import looks_like_hub_id

    return looks_like_hub_id(text)


async def _pull(model_id: str, body: LaunchRequest, home: Home) -> str:
    """Pull a hub ID into this server's own home (not the default one) before launching it."""
    from ragserve.hub import HubError, pull_model

    try:
        path = await asyncio.to_thread(pull_model, model_id, home, source=body.source,
                                       revision=body.revision, quant=body.quantization, progress=False)
    except HubError as exc:
        raise APIError(400, str(exc), code=getattr(exc, "kind", None) or "pull_failed", param="model_path") \
            from exc
    return str(path)


async def _check_memory(spec: ModelSpec, force: bool) -> None:
    """The memory plan, before any worker starts. An estimate that cannot be made is a 400 naming the file,
    never a launch without the check."""
    from ragserve.control import memory

    if force:
        return
    try:
        await asyncio.to_thread(memory.check_fits, spec)
    except memory.InsufficientMemory as exc:
        raise APIError(400, f"{exc} Pass force=true (--force) to launch anyway.", code="insufficient_memory") from exc
    except memory.EstimateError as exc:
        raise APIError(400, f"{exc} Pass force=true (--force) to launch without the memory check.",
                       code="memory_estimate_failed", param="model_path") from exc
