"""The process that hosts one model: loads the engine, serves it over loopback HTTP to the gateway.

Started by the supervisor as `python -m ragserve.workers.worker --spec-file F --port P`.
It answers /health at once (state loading), loads the engine in a thread, then serves.
"""

from __future__ import annotations

import argparse
import asyncio
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
from ragserve.api.errors import APIError, error_body, install_error_handlers
from ragserve.api.fast_routes import FastJSONRoutes
from ragserve.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RerankRequest
from ragserve.control.spec import ModelSpec, ModelState
from ragserve.engines import load_engine
from ragserve.engines.base import (Engine, EngineError, EngineInputError, EmbeddingEngine, GenerationRequest,
                                   LLMEngine, RerankEngine)
from ragserve.workers import openai_format
from ragserve.workers.batching import (BatchResult, DynamicBatcher, QueueTimeout, embedding_batcher,
                                       rerank_batcher)
from ragserve.workers.inputs import embedding_texts
from ragserve.workers.streaming import StreamCut, cut_streams, iterate_in_thread

log = logging.getLogger("ragserve.worker")


DEFAULT_MAX_QUEUE = 256
DEFAULT_QUEUE_TIMEOUT_S = 60.0
WORKER_KEEP_ALIVE_S = 120
# On SIGTERM uvicorn lets requests run this long, then cancels them; streams are ended (with an error
# event and [DONE]) a second before that, and the supervisor kills the worker a little after.
GRACEFUL_SHUTDOWN_S = 5
STREAM_CUT_MARGIN_S = 1.0
USAGE_TRAILER_HEADER_BYTES = USAGE_TRAILER_HEADER.encode()


def queue_timeout_s() -> float:
    """Seconds a request may wait for the engine before it gets 503 queue_timeout (RAGSERVE_QUEUE_TIMEOUT)."""
    raw = os.environ.get("RAGSERVE_QUEUE_TIMEOUT")
    if raw is None or raw.strip() == "":
        return DEFAULT_QUEUE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        log.warning("ignoring RAGSERVE_QUEUE_TIMEOUT=%r: it must be a number of seconds above 0; using %g",
                    raw, DEFAULT_QUEUE_TIMEOUT_S)
        return DEFAULT_QUEUE_TIMEOUT_S
    return value


class WorkerRuntime:
    """The engine and its state; requests wait here until the engine is ready."""

    def __init__(self, spec: ModelSpec, max_queue: int = DEFAULT_MAX_QUEUE):
        self.spec = spec
        self.engine: Optional[Engine] = None
        self.state = ModelState.LOADING
        self.error: Optional[str] = None
        self.loaded_in_s: Optional[float] = None
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s()
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

    def queue_timeout(self, waited_s: float) -> APIError:
        return APIError(503, f"model {self.spec.uid} is busy: this request waited {waited_s:.0f} s in its queue "
                             f"without starting (RAGSERVE_QUEUE_TIMEOUT={self.queue_timeout_s:g}). Retry later, send "
                             f"fewer requests at once, or launch another replica", code="queue_timeout",
                        headers={"Retry-After": str(max(1, round(self.queue_timeout_s / 10)))})

    async def take_llm_slot(self, engine: LLMEngine) -> None:
        """Wait for a free generation slot, at most queue_timeout_s."""
        if self.llm_slots is None:
            self.llm_slots = asyncio.Semaphore(max(1, engine.max_concurrency))
        self.waiting += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.llm_slots.acquire(), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise self.queue_timeout(time.monotonic() - started) from None
        finally:
            self.waiting -= 1


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


def _sse_event(chunk: dict) -> str:
    if isinstance(chunk, openai_format.UsageTrailer):
        return f"{USAGE_TRAILER_PREFIX}{json.dumps(chunk)}\n\n"
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def _sse_error(status: int, message: str, code: Optional[str]) -> str:
    """An error after the stream's 200: an OpenAI error object as the last event, before [DONE]."""
    return f"data: {json.dumps(error_body(status, message, code), ensure_ascii=False)}\n\n"


def _sse(first: Optional[dict], chunks, on_close=None):
    """The stream of `first` (already taken, so input errors were a plain 400) and the rest of `chunks`."""
    async def stream():
        try:
            if first is not None:
                yield _sse_event(first)
            async for chunk in chunks:
                yield _sse_event(chunk)
        except EngineError as exc:
            error = _engine_error(exc)
            yield _sse_error(error.status_code, error.message, error.code)
        except StreamCut as exc:
            yield _sse_error(503, str(exc), "server_shutting_down")
        except Exception as exc:  # the stream already started with 200: report in-band
            log.exception("stream failed")
            yield _sse_error(500, f"{type(exc).__name__}: {exc}", "internal_error")
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

    async def run_generation(body, chat: bool, scope: dict):
        engine: LLMEngine = runtime.require(LLMEngine)
        runtime.admit()
        request = _generation_request(body)
        # Some chat templates open <think> in the prompt; the output then starts inside reasoning. Rendering
        # runs off the event loop (vLLM renders over HTTP), and a template that refuses the messages is a 400.
        try:
            in_reasoning = chat and await asyncio.to_thread(engine.opens_reasoning, request)
        except EngineError as exc:
            raise _engine_error(exc) from exc
        await runtime.take_llm_slot(engine)
        released = False

        def release_slot() -> None:
            # Called when the stream ends and again after the response: a client that leaves
            # before the first byte never runs the generator, and must not keep the slot.
            nonlocal released
            if not released:
                released = True
                runtime.llm_slots.release()

        try:
            if body.stream:
                return await stream_generation(body, chat, scope, engine, request, in_reasoning, release_slot)
            return await whole_generation(body, chat, engine, request, in_reasoning)
        except EngineError as exc:
            raise _engine_error(exc) from exc
        except StreamCut as exc:
            raise APIError(503, str(exc), code="server_shutting_down", headers={"Retry-After": "2"}) from exc
        finally:
            if not body.stream:
                release_slot()

    async def stream_generation(body, chat, scope, engine, request, in_reasoning, release_slot):
        """Start the stream and wait for the engine's first piece before answering: an input error
        (prompt longer than the context...) is then a plain 400, not an error inside a 200 stream."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_trailer = _wants_usage_trailer(scope)

        def make():  # in the stream's thread
            deltas = _started(engine.generate(request))
            if chat:
                return openai_format.chat_completion_chunks(body.model, deltas, split_reasoning, include_usage,
                                                            in_reasoning, usage_trailer)
            return openai_format.text_completion_chunks(body.model, deltas, include_usage, usage_trailer)

        async def chunks():
            try:
                async for chunk in iterate_in_thread(make):
                    yield chunk
            finally:
                release_slot()

        stream = chunks()
        try:
            first = await anext(stream, None)
        except BaseException:
            release_slot()
            raise
        return _sse(first, stream, on_close=release_slot)

    async def whole_generation(body, chat, engine, request, in_reasoning):
        # Through the stream bridge, so that a caller who leaves stops the generation at the next token.
        deltas = [delta async for delta in iterate_in_thread(lambda: engine.generate(request))]
        if chat:
            return openai_format.chat_completion(body.model, deltas, split_reasoning, in_reasoning)
        return openai_format.text_completion(body.model, deltas)

    async def chat(body: ChatCompletionRequest, raw: bytes, scope: dict):
        return await run_generation(body, True, scope)

    async def completions(body: CompletionRequest, raw: bytes, scope: dict):
        return await run_generation(body, False, scope)

    def engine_batcher(engine: Engine) -> DynamicBatcher:
        # Made on first use: the engine (and its max_batch_size) exists only once loaded.
        batcher = getattr(app.state, "batcher", None)
        if batcher is None:
            make = embedding_batcher if isinstance(engine, EmbeddingEngine) else rerank_batcher
            batcher = app.state.batcher = make(engine, runtime.spec, runtime.executor, runtime.queue_timeout_s)
        return batcher

    async def in_engine_thread(engine: Engine, key, items: list[str], scope: dict) -> BatchResult:
        """Queue items for the engine thread; concurrent callers with the same key share one call.
        A caller who leaves takes its items out of the queue, or stops the call it alone waits for."""
        runtime.admit()
        runtime.waiting += 1
        try:
            return await engine_batcher(engine).submit(key, items)
        except EngineError as exc:
            raise _engine_error(exc) from exc
        except QueueTimeout as exc:
            raise runtime.queue_timeout(exc.waited_s) from exc
        finally:
            runtime.waiting -= 1

    async def embeddings(body: EmbeddingRequest, raw: bytes, scope: dict):
        engine: EmbeddingEngine = runtime.require(EmbeddingEngine)
        texts = embedding_texts(body)
        if body.dimensions is not None:
            if not engine.supports_dimensions and body.dimensions != engine.dimensions:
                raise APIError(400, f"model {body.model} does not support `dimensions` (it is not a Matryoshka "
                                    f"model); leave it out to get all {engine.dimensions} dimensions",
                               param="dimensions")
            if body.dimensions > engine.dimensions:
                raise APIError(400, f"dimensions={body.dimensions} exceeds the model's {engine.dimensions}",
                               param="dimensions")
        output = await in_engine_thread(engine, (body.wants_query(), body.instruction), texts, scope)
        vectors = openai_format.cut_dimensions(np.asarray(output.items, dtype=np.float32), body.dimensions)
        return openai_format.embedding_list(body.model, vectors, output.prompt_tokens, body.encoding_format)

    async def rerank(body: RerankRequest, raw: bytes, scope: dict):
        engine: RerankEngine = runtime.require(RerankEngine)
        documents: list[str] = body.documents  # type: ignore[assignment]  # validated to text
        output = await in_engine_thread(engine, (body.query, body.instruction), documents, scope)
        return openai_format.rerank_result(body.model, documents, output.items, output.prompt_tokens,
                                           body.top_n, body.return_documents, body.return_len, output.truncated)

    # Answered without FastAPI's per-request layers (api/fast_routes.py); only the gateway calls these, so
    # they need no FastAPI twins for /docs.
    app.add_middleware(FastJSONRoutes, routes={"/v1/chat/completions": (ChatCompletionRequest, chat),
                                               "/v1/completions": (CompletionRequest, completions),
                                               "/v1/embeddings": (EmbeddingRequest, embeddings),
                                               "/v1/rerank": (RerankRequest, rerank)})
    return app


def _started(deltas):
    """Take the engine's first delta now (prompt checks happen there), and then yield it and the rest."""
    first = next(deltas, None)

    def chained():
        try:
            if first is not None:
                yield first
            yield from deltas
        finally:
            close = getattr(deltas, "close", None)
            if close:
                close()
    return chained()


def _wants_usage_trailer(scope: dict) -> bool:
    """The gateway counts tokens of every stream; it asks for them with this header."""
    return any(name == USAGE_TRAILER_HEADER_BYTES for name, _ in scope.get("headers") or ())


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
                            log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    _GatewayOwnedServer(config).run()


class _GatewayOwnedServer(uvicorn.Server):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, workers included. The gateway then
    drains its in-flight requests, which needs the workers alive; it stops them (SIGTERM) when done."""

    _loop: Optional[asyncio.AbstractEventLoop] = None
    _cut_scheduled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGINT:
            return
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._cut_scheduled:
            # Streams still running when the drain time is up end with an error event and [DONE]
            # (a client can tell that from a finished answer), not with a dropped connection.
            self._cut_scheduled = True
            delay = max(0.0, (self.config.timeout_graceful_shutdown or 0) - STREAM_CUT_MARGIN_S)
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, _cut_for_shutdown)


def _cut_for_shutdown() -> None:
    count = cut_streams("the model's worker is stopping (the server is shutting down or the model was "
                        "terminated) and its drain time ran out: the answer is incomplete; send the request again")
    if count:
        log.warning("drain time is up: ended %d running stream(s) with an error event", count)


if __name__ == "__main__":
    main()
