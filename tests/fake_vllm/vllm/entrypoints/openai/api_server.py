"""Stand-in for vLLM's OpenAI-compatible server: vLLM's CLI flags and HTTP shapes, real CPU models.

What it runs, chosen from the flags the way vLLM chooses (runner, convert, hf_overrides):
  generate             a .gguf model through xllamacpp (chat template from the GGUF);
  pooling, embed       sentence-transformers folders through SentenceTransformer (vLLM reads the
                       same modules.json pooling/normalize), Qwen3 causal LMs by last-token pooling
                       + L2 norm of the text as given (vLLM adds no instruction and no EOS itself);
  pooling, classify    cross-encoders through CrossEncoder (sigmoid of the one logit);
                       Qwen3 with is_original_qwen3_reranker: sigmoid(logit_yes - logit_no) at the
                       end of query + document concatenated as text, as vLLM scores it.
A pooling model without a score head scores pairs by cosine similarity, as vLLM falls back to.

Simulated failure: a KV cache of FAKE_VLLM_KV_TOKENS tokens (default 65536). A larger
--max-model-len fails at start-up with vLLM's own error text, as an over-long context does on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

FLAG_STYLE = os.environ.get("FAKE_VLLM_FLAG_STYLE", "runner")  # "task": behave like vLLM < 0.10


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm.entrypoints.openai.api_server",
                                     description="fake vLLM OpenAI-compatible API server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key")
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
    if FLAG_STYLE == "task":
        parser.add_argument("--task", default="auto", choices=["auto", "generate", "embed", "score", "classify"])
    else:
        parser.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"])
        parser.add_argument("--convert", default="auto", choices=["auto", "none", "embed", "classify"])
    # vLLM's parser accepts underscores too (--hf_overrides); argparse here does not need to.
    args = parser.parse_args(argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error("argument --gpu-memory-utilization: must be in (0, 1]")
    return args


def _config(path: str) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def mode_of(args: argparse.Namespace) -> str:
    """'generate', 'embed' or 'score', decided from the flags like vLLM's model config does."""
    architectures = args.hf_overrides.get("architectures") or _config(args.model).get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if FLAG_STYLE == "task":
        task = args.task
        if task == "auto":
            return "score" if classifier else "generate"
        return {"generate": "generate", "embed": "embed", "score": "score", "classify": "score"}[task]
    if args.runner == "generate" or (args.runner == "auto" and not classifier):
        return "generate"
    if args.convert == "embed":
        return "embed"
    return "score" if classifier or args.convert == "classify" else "embed"


class ChatModel:
    def __init__(self, args: argparse.Namespace):
        import xllamacpp as xlc

        if not args.model.endswith(".gguf"):
            raise SystemExit("fake vllm: chat is only served from a .gguf model here")
        params = xlc.CommonParams()
        params.model.path = args.model
        self.n_ctx = args.max_model_len or 2048
        params.n_ctx = self.n_ctx
        params.n_parallel = 4
        params.kv_unified = True
        params.use_jinja = True
        params.reasoning_format = xlc.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
        params.n_gpu_layers = 0
        params.warmup = False
        self.server = xlc.Server(params)

    def run(self, body: dict[str, Any], chat: bool, stream: bool):
        payload = {k: body[k] for k in ("messages", "prompt", "temperature", "top_p", "seed", "stop",
                                        "presence_penalty", "frequency_penalty", "chat_template_kwargs")
                   if body.get(k) is not None}
        payload["n_predict"] = body.get("max_tokens") or -1
        handler = self.server.handle_chat_completions if chat else self.server.handle_completions
        if not stream:
            return handler(payload)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        pieces: queue.Queue = queue.Queue()

        def produce() -> None:
            try:
                handler(payload, pieces.put)
            finally:
                pieces.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (item := pieces.get()) is not None:
            yield item


class EmbedModel:
    def __init__(self, args: argparse.Namespace):
        self.qwen3 = _config(args.model).get("model_type") == "qwen3"
        if self.qwen3:
            self.causal = _causal_lm(args.model)
            self.tokenizer = _tokenizer(args.model)
        else:
            from sentence_transformers import SentenceTransformer

            self.st = SentenceTransformer(args.model, device="cpu")
            self.tokenizer = self.st.tokenizer

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        import torch

        if not self.qwen3:
            vectors = self.st.encode(texts, convert_to_numpy=True)
            tokens = sum(len(ids) for ids in self.tokenizer(texts)["input_ids"])
            return vectors.tolist(), tokens
        out, tokens = [], 0
        for text in texts:
            ids = self.tokenizer(text)["input_ids"]
            tokens += len(ids)
            with torch.no_grad():
                hidden = self.causal.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            out.append(torch.nn.functional.normalize(hidden, dim=-1).tolist())
        return out, tokens


class ScoreModel:
    def __init__(self, args: argparse.Namespace):
        overrides = args.hf_overrides
        self.qwen3_yes_no = bool(overrides.get("is_original_qwen3_reranker"))
        self.embedder = None
        if self.qwen3_yes_no:
            self.causal = _causal_lm(args.model)
            self.tokenizer = _tokenizer(args.model)
            no_token, yes_token = overrides["classifier_from_token"]
            self.yes = self.tokenizer.convert_tokens_to_ids(yes_token)
            self.no = self.tokenizer.convert_tokens_to_ids(no_token)
        elif any(a.endswith("ForSequenceClassification") for a in _config(args.model).get("architectures") or []):
            from sentence_transformers import CrossEncoder

            self.cross = CrossEncoder(args.model, device="cpu")
            self.tokenizer = self.cross.tokenizer
        else:
            self.embedder = EmbedModel(args)  # no score head: cosine similarity of embeddings

    def score(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        import torch

        if self.embedder is not None:
            vectors, tokens = self.embedder.embed([query, *documents])
            q = torch.tensor(vectors[0])
            return [float(torch.dot(q, torch.tensor(v))) for v in vectors[1:]], tokens
        if not self.qwen3_yes_no:
            pairs = [(query, d) for d in documents]
            scores = self.cross.predict(pairs, convert_to_numpy=True)
            tokens = sum(len(ids) for ids in self.tokenizer([q for q, _ in pairs], [d for _, d in pairs])["input_ids"])
            return [float(s) for s in scores], tokens
        scores, tokens = [], 0
        for doc in documents:
            ids = self.tokenizer(query + doc)["input_ids"]  # an LLM reranker: text concatenation
            tokens += len(ids)
            with torch.no_grad():
                logits = self.causal(input_ids=torch.tensor([ids])).logits[0, -1]
            scores.append(float(torch.sigmoid(logits[self.yes] - logits[self.no])))
        return scores, tokens


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _causal_lm(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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
    model: Any = {"generate": ChatModel, "embed": EmbedModel, "score": ScoreModel}[mode](args)
    max_model_len = getattr(model, "n_ctx", None) or args.max_model_len or 512
    app = FastAPI()

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if args.api_key and request.url.path.startswith(("/v1", "/score", "/rerank")):
            if request.headers.get("authorization") != f"Bearer {args.api_key}":
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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"INFO [api_server.py] vLLM API server version 0.0.0-fake; args: {vars(args)}", file=sys.stderr,
          flush=True)
    check_kv_cache(args)
    app = create_app(args, mode_of(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
