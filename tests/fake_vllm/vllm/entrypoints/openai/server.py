"""Stand-in for `vllm serve`: vLLM's CLI flags and HTTP shapes, real CPU models (see .models).

What it runs, chosen from the flags the way vLLM chooses (runner, convert, hf_overrides):
  generate             a .gguf model through xllamacpp, or a Hugging Face causal-LM folder
                       through transformers (its chat template, or --chat-template);
  pooling, embed       sentence-transformers folders through SentenceTransformer (vLLM reads the
                       same modules.json pooling/normalize), Qwen3 causal LMs by last-token pooling
                       + L2 norm of the text as given (vLLM adds no instruction and no EOS itself);
  pooling, classify    cross-encoders through CrossEncoder (sigmoid of the one logit);
                       Qwen3 with is_original_qwen3_reranker: sigmoid(logit_yes - logit_no) at the
                       end of query + document concatenated as text, as vLLM scores it.
A pooling model without a score head scores pairs by cosine similarity, as vLLM falls back to.
Chat models answer /tokenize (messages or prompt) and /detokenize as vLLM does. The API key
comes from --api-key or the VLLM_API_KEY environment variable, as in vLLM.

A (query, document) pair longer than max_model_len is refused with vLLM's 400 and wording.

Simulated failures, with vLLM's own error text after its usual start-up log lines:
  - a KV cache of FAKE_VLLM_KV_TOKENS tokens (default 65536): a larger --max-model-len fails;
  - a config.json architecture no model class here serves: "Model architectures [...] are not
    supported for now".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from vllm.entrypoints.openai import models as fake_models

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "BertModel",
                           "BertForSequenceClassification", "LlamaForCausalLM")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm serve", usage="vllm serve [model_tag] [options]",
                                     description="fake vLLM OpenAI-compatible API server")
    parser.add_argument("model_tag")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", nargs="+")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    parser.add_argument("--quantization")
    parser.add_argument("--tokenizer")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--chat-template")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--hf-overrides", type=json.loads, default={})
    parser.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"])
    parser.add_argument("--convert", default="auto", choices=["auto", "none", "embed", "classify"])
    # vLLM's parser accepts underscores too (--hf_overrides); argparse here does not need to.
    args = parser.parse_args(argv)
    args.model = args.model_tag
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error("argument --gpu-memory-utilization: must be in (0, 1]")
    return args


def mode_of(args: argparse.Namespace) -> str:
    """'generate', 'embed' or 'score', decided from the flags like vLLM's model config does."""
    architectures = args.hf_overrides.get("architectures") or fake_models.config_of(args.model).get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if args.runner == "generate" or (args.runner == "auto" and not classifier):
        return "generate"
    if args.convert == "embed":
        return "embed"
    return "score" if classifier or args.convert == "classify" else "embed"


def log_start(args: argparse.Namespace) -> None:
    """vLLM's start-up chatter: enough lines that an error tail must be cut from the end."""
    info = "INFO 01-01 00:00:00 [api_server.py]"
    print(f"{info} vLLM API server version 0.99.0 (stand-in)", file=sys.stderr)
    print(f"{info} non-default args: {vars(args)}", file=sys.stderr)
    for step in range(1, 25):
        print(f"INFO 01-01 00:00:00 [startup.py] start-up step {step} of 24", file=sys.stderr)
    sys.stderr.flush()


def check_architecture(args: argparse.Namespace) -> None:
    architectures = args.hf_overrides.get("architectures") or fake_models.config_of(args.model).get("architectures")
    if args.model.endswith(".gguf") or not architectures or any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return
    print("ERROR 01-01 00:00:00 [core.py] EngineCore failed to start.", file=sys.stderr)
    print("Traceback (most recent call last):", file=sys.stderr)
    print(f"ValueError: Model architectures {architectures} are not supported for now. Supported architectures: "
          f"{list(SUPPORTED_ARCHITECTURES)}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def check_kv_cache(args: argparse.Namespace) -> None:
    capacity = int(os.environ.get("FAKE_VLLM_KV_TOKENS", "65536"))
    if args.max_model_len and args.max_model_len > capacity:
        print("INFO [gpu_worker.py] Available KV cache memory: 1.50 GiB", file=sys.stderr)
        print("ERROR [core.py] EngineCore failed to start.", file=sys.stderr)
        print("Traceback (most recent call last):", file=sys.stderr)
        print(f"ValueError: To serve at least one request with the models's max seq len ({args.max_model_len}), "
              f"(1.50 GiB KV cache is needed, which is larger than the available KV cache memory (0.80 GiB). "
              f"Based on the available memory, the estimated maximum model length is {capacity}. Try "
              f"increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.",
              file=sys.stderr, flush=True)
        raise SystemExit(1)


def error(status: int, message: str, kind: str = "BadRequestError"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


def create_app(args: argparse.Namespace, mode: str):
    name = (args.served_model_name or [args.model])[0]
    model: Any = _model_class(args, mode)(args)
    max_model_len = getattr(model, "n_ctx", None) or args.max_model_len or 512
    app = FastAPI()
    # --api-key wins over VLLM_API_KEY, as in vLLM.
    keys = [f"Bearer {key}" for key in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if key]

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if keys and request.url.path.startswith(("/v1", "/score", "/rerank")):
            if request.headers.get("authorization") not in keys:
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    def health():
        return JSONResponse(None)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "vllm", "root": args.model, "parent": None,
                                            "max_model_len": max_model_len}]}

    def check(body: dict[str, Any], wanted: str):
        if body.get("model") != name:
            return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if mode != wanted:
            return error(400, f"The model does not support the {wanted} API")
        return None

    def completion(body: dict[str, Any], chat: bool):
        if (bad := check(body, "generate")) is not None:
            return bad
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            result = model.run(body, chat, stream=False)
            if "error" in result:
                return error(400, str(result["error"]))
            result.update(id=rid, model=name, object=kind)
            return result
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events():
            created = int(time.time())
            if chat:  # vLLM opens a chat stream with the role
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
            usage = None
            for item in model.run(body, chat, stream=True):
                if "error" in item:
                    yield _sse({"error": {"message": str(item["error"]), "type": "BadRequestError", "code": 400}})
                    break
                usage = item.get("usage") or usage
                for choice in item.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    finish = choice.get("finish_reason")
                    if not text and not finish:
                        continue
                    out = {"index": 0, "logprobs": None, "finish_reason": finish}
                    out.update({"delta": {"content": text or ""}} if chat else {"text": text or ""})
                    yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                "model": name, "choices": [out]})
            if include_usage and usage:
                yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                            "model": name, "choices": [],
                            "usage": {"prompt_tokens": usage["prompt_tokens"],
                                      "completion_tokens": usage["completion_tokens"],
                                      "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return completion(await request.json(), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return completion(await request.json(), chat=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        if (bad := check(body, "generate")) is not None:
            return bad
        try:
            tokens = model.tokenize(body)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault, as in vLLM
            return error(400, f"{type(exc).__name__}: {exc}")
        return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await request.json()
        if (bad := check(body, "generate")) is not None:
            return bad
        return {"prompt": model.detokenize(body["tokens"])}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        if (bad := check(body, "embed")) is not None:
            return bad
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors, tokens = model.embed(texts)
        return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
                "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    @app.post("/v1/rerank")
    @app.post("/rerank")
    async def rerank(request: Request):
        body = await request.json()
        if (bad := check(body, "score")) is not None:
            return bad
        for document in body["documents"]:  # vLLM refuses an over-long pair, it does not cut it
            token_num = model.pair_tokens(body["query"], document)
            if token_num > max_model_len:
                return error(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                  f"requested {token_num} tokens in the input for score. Please reduce the length "
                                  f"of the input.")
        scores, tokens = model.score(body["query"], list(body["documents"]))
        results = sorted(({"index": i, "document": {"text": d}, "relevance_score": s}
                          for i, (d, s) in enumerate(zip(body["documents"], scores))),
                         key=lambda r: r["relevance_score"], reverse=True)
        top_n = body.get("top_n") or len(results)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": name, "usage": {"total_tokens": tokens},
                "results": results[:top_n]}

    return app


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _model_class(args: argparse.Namespace, mode: str):
    if mode == "generate":
        return fake_models.GGUFChatModel if args.model.endswith(".gguf") else fake_models.HFChatModel
    return {"embed": fake_models.EmbedModel, "score": fake_models.ScoreModel}[mode]


def serve(argv: list[str]) -> None:
    """`vllm serve MODEL [flags]`: check, load, then serve until stopped."""
    import uvicorn

    args = parse_args(argv)
    log_start(args)
    check_kv_cache(args)
    check_architecture(args)
    app = create_app(args, mode_of(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
