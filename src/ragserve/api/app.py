"""The gateway: validates requests, routes them to the model's worker, and manages models.

It never runs a model itself, so it starts in well under a second and stays small.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ragserve import __version__
from ragserve.api.errors import APIError, install_error_handlers, model_not_found
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
        "state": record.state.value,
        "error": record.error,
        "restarts": record.restarts,
        "replica": 1,
        "address": record.base_url if record.port else None,
        "info": record.info,
    }


def create_app(home: Home, *, relaunch_saved: bool = True) -> FastAPI:
    supervisor = Supervisor(home)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        supervisor.start()
        app.state.proxy = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                            limits=httpx.Limits(max_connections=1024,
                                                                max_keepalive_connections=256))
        if relaunch_saved:
            for spec in supervisor.saved_specs():
                log.info("relaunching %s from the last run", spec.uid)
                asyncio.create_task(_relaunch(spec))
        try:
            yield
        finally:
            await supervisor.shutdown()
            await app.state.proxy.aclose()

    async def _relaunch(spec: ModelSpec) -> None:
        try:
            await supervisor.launch(spec, wait_ready=False)
        except Exception as exc:
            log.error("relaunching %s failed: %s", spec.uid, exc)

    app = FastAPI(title="ragserve", version=__version__, lifespan=lifespan,
                  description="OpenAI- and Xinference-compatible serving of chat, embedding and rerank models.")
    app.state.supervisor = supervisor
    app.state.home = home
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

    async def forward(record: ModelRecord, route: str, raw_body: bytes, stream: bool) -> Response:
        url = f"{record.base_url}{route}"
        headers = {"content-type": "application/json"}
        proxy: httpx.AsyncClient = app.state.proxy
        try:
            if not stream:
                upstream = await proxy.post(url, content=raw_body, headers=headers)
                return Response(upstream.content, status_code=upstream.status_code,
                                media_type=upstream.headers.get("content-type", "application/json"),
                                headers={k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"})
            request = proxy.build_request("POST", url, content=raw_body, headers=headers)
            upstream = await proxy.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _worker_lost(record, exc) from exc
        if upstream.status_code != 200:
            body = await upstream.aread()
            await upstream.aclose()
            return Response(body, status_code=upstream.status_code, media_type="application/json")

        async def relay():
            try:
                async for piece in upstream.aiter_raw():
                    yield piece
            except httpx.HTTPError as exc:
                message = _worker_lost(record, exc).message.replace('"', "'")
                yield f'data: {{"error": {{"message": "{message}", "type": "service_unavailable"}}}}\n\n'.encode()
                yield b"data: [DONE]\n\n"
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _worker_lost(record: ModelRecord, exc: Exception) -> APIError:
        return APIError(503, f"the worker of model {record.spec.uid!r} stopped answering ({type(exc).__name__}); "
                             f"it is restarted automatically, retry in a few seconds",
                        code="worker_unavailable", headers={"Retry-After": "2"})

    async def serve_route(route: str, request: Request, body: Any) -> Response:
        record = routable(body.model, route)
        return await forward(record, route, await request.body(), bool(getattr(body, "stream", False)))

    # ---- OpenAI routes -----------------------------------------------------------------------

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serve_route("/v1/chat/completions", request, body)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serve_route("/v1/completions", request, body)

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await serve_route("/v1/embeddings", request, body)

    @app.post("/v1/rerank", tags=["rerank"])
    @app.post("/rerank", tags=["rerank"], include_in_schema=False)
    @app.post("/v2/rerank", tags=["rerank"], include_in_schema=False)
    async def rerank(body: RerankRequest, request: Request) -> Response:
        record = routable(body.model, "/v1/rerank")
        # Forward the validated body: Cohere/Jina/TEI shapes are normalised here.
        payload = body.model_dump_json(exclude_none=True).encode()
        return await forward(record, "/v1/rerank", payload, stream=False)

    # ---- model management (OpenAI list + Xinference launch/describe/terminate) ---------------

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_description(r) for r in supervisor.records.values()]}

    @app.get("/v1/models/{model_uid}", tags=["models"])
    async def describe_model(model_uid: str) -> dict[str, Any]:
        return model_description(find_record(model_uid))

    @app.post("/v1/models", tags=["models"])
    async def launch_model(body: LaunchRequest) -> JSONResponse:
        try:
            size = body.size_b()
        except ValueError as exc:
            raise APIError(400, str(exc), param="size_in_billions") from exc
        options = dict(body.options)
        for key, value in (body.model_extra or {}).items():
            options.setdefault(key, value)  # Xinference sends engine kwargs flat
        model_path = body.model_path
        if model_path and _is_hub_id(model_path):
            model_path = await _pull(model_path, body)
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
        record = await supervisor.launch(spec, wait_ready=body.wait_ready)
        if record.state == ModelState.FAILED:
            raise APIError(500, f"model {spec.uid!r} failed to load: {record.error}", code="load_failed")
        return JSONResponse({"model_uid": spec.uid, "state": record.state.value})

    @app.delete("/v1/models/{model_uid}", tags=["models"])
    async def terminate_model(model_uid: str) -> dict[str, Any]:
        record = find_record(model_uid)
        await supervisor.terminate(record.spec.uid)
        return {"model_uid": record.spec.uid, "terminated": True}

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        states = {uid: r.state.value for uid, r in supervisor.records.items()}
        return {"status": "ok", "version": __version__, "models": states}

    return app


def _is_hub_id(text: str) -> bool:
    try:
        from ragserve.hub import looks_like_hub_id
    except ImportError:
        return False
    return looks_like_hub_id(text)


async def _pull(model_id: str, body: LaunchRequest) -> str:
    from ragserve.hub import HubError, pull_model
    from ragserve.settings import resolve_home

    try:
        path = await asyncio.to_thread(pull_model, model_id, resolve_home(), source=body.source,
                                       revision=body.revision, quant=body.quantization, progress=False)
    except HubError as exc:
        raise APIError(400, str(exc), code="pull_failed", param="model_path") from exc
    return str(path)


async def _check_memory(spec: ModelSpec, force: bool) -> None:
    try:
        from ragserve.control import memory
    except ImportError:
        return
    check = getattr(memory, "check_fits", None)
    if check is None or force:
        return
    try:
        await asyncio.to_thread(check, spec)
    except memory.InsufficientMemory as exc:
        raise APIError(400, f"{exc} Pass force=true (--force) to launch anyway.", code="insufficient_memory") from exc
