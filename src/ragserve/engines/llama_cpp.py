"""GGUF models through llama.cpp (the prebuilt `xllamacpp` binding): chat, embedding, rerank.

xllamacpp embeds llama.cpp's server core in-process: chat templates from the GGUF (jinja),
parallel slots with continuous batching, embeddings with the GGUF's pooling, and rank
pooling for classifier-head rerankers. Chosen over llama-cpp-python because it installs as
a wheel in seconds (no compiler, no CPU-flag crash on VMs) and batches concurrent requests.

Rerankers (rank pooling or the Qwen3 yes/no rule) live in ragserve.engines.llama_rerank.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import qwen3, rerank_fit
from ragserve.engines.base import (EmbeddingEngine, EmbeddingOutput, EngineError, EngineInputError,
                                   GenerationDelta, GenerationRequest, LLMEngine, ShouldStop)

from ragserve.engines.defaults import (LLAMA_CHAT_CTX as DEFAULT_CHAT_CTX, LLAMA_CHAT_PARALLEL,
                                       LLAMA_EMBED_CTX as DEFAULT_EMBED_CTX)


def _read_gguf_metadata(path: str) -> dict[str, Any]:
    """GGUF facts (ragserve.engines.gguf_meta), the Qwen3 family, and the ids of "yes"/"no"."""
    facts = qwen3.gguf_info(path, tokens=True)
    tokens = facts.get("tokens") or []
    facts["token_ids"] = {tok: i for i, tok in enumerate(tokens) if tok in ("yes", "no", "\u0120yes", "\u0120no")}
    return facts


def _special_token(metadata: dict[str, Any], which: str) -> str:
    """The text of the bos/eos token, as llama.cpp hands it to the chat template."""
    index = metadata["fields"].get(f"tokenizer.ggml.{which}_token_id")
    tokens = metadata.get("tokens") or []
    return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""


def compile_chat_template(template: str, where: str):
    """A jinja chat template, compiled once as llama.cpp and transformers read them (sandboxed,
    trim_blocks/lstrip_blocks, raise_exception, strftime_now, tojson)."""
    import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise EngineError(f"the chat template of {where} is not valid jinja ({exc}): launch it with a corrected "
                          f"--chat_template") from exc


def render_chat_template(compiled, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
                         **kwargs: Any) -> str:
    """The prompt the template gives for `messages` with the generation prompt."""
    from jinja2.exceptions import TemplateError

    try:
        return compiled.render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                               eos_token=eos_token, **kwargs)
    except TemplateError as exc:
        raise EngineInputError(f"the chat template rejected these messages: {exc}") from exc


def _threads(spec: ModelSpec) -> int:
    return int(spec.options.get("n_threads") or os.environ.get("RAGSERVE_THREADS") or os.cpu_count() or 2)


def _server(spec: ModelSpec, *, n_ctx: int, n_parallel: int, embedding: bool = False,
            pooling: Optional[str] = None, prompt_cache_mib: Optional[int] = None):
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = spec.model_path
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    params.kv_unified = True  # slots share the whole context instead of n_ctx / n_parallel each
    params.cpuparams.n_threads = _threads(spec)
    params.cpuparams_batch.n_threads = _threads(spec)
    params.n_gpu_layers = int(spec.options.get("n_gpu_layers", -1 if _gpu_build() else 0))
    params.use_jinja = True
    if spec.options.get("chat_template"):  # a jinja template that replaces the GGUF's own
        params.chat_template = str(spec.options["chat_template"])
    # Keep <think> in the text: the worker splits reasoning the same way for every engine.
    params.reasoning_format = xlc.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
    params.verbosity = int(spec.options.get("llama_verbosity", -1))
    # Exactness knobs: llama.cpp's defaults (flash attention, f16 KV cache) move scores by ~5e-4;
    # flash_attn=off with an f32 cache reproduces a reference computation to ~1e-7.
    flash = spec.options.get("flash_attn")
    if flash is not None:
        mode = {"on": "ENABLED", "true": "ENABLED", "1": "ENABLED", "off": "DISABLED", "false": "DISABLED",
                "0": "DISABLED", "auto": "AUTO"}.get(str(flash).strip().lower())
        if mode is None:
            raise EngineError(f"flash_attn {flash!r} is unknown: use on, off or auto")
        params.flash_attn_type = getattr(xlc.llama_flash_attn_type, f"LLAMA_FLASH_ATTN_TYPE_{mode}")
    for key in ("cache_type_k", "cache_type_v"):
        if spec.options.get(key):
            name = f"GGML_TYPE_{str(spec.options[key]).strip().upper()}"
            if not hasattr(xlc.ggml_type, name):
                raise EngineError(f"{key} {spec.options[key]!r} is unknown: use f32, f16, bf16, q8_0 ...")
            setattr(params, key, getattr(xlc.ggml_type, name))
    params.warmup = False
    if prompt_cache_mib is not None:  # llama.cpp's host-RAM cache of evicted slot prompts (default 8 GiB)
        params.cache_ram_mib = prompt_cache_mib
    # No context shifting: a request without max_tokens ends when the context is full (finish_reason
    # "length") instead of generating forever.
    params.ctx_shift = False
    if embedding:
        params.embedding = True
        params.n_batch = params.n_ubatch = n_ctx  # embeddings must fit one ubatch
        if pooling:
            params.pooling_type = getattr(xlc.llama_pooling_type, f"LLAMA_POOLING_TYPE_{pooling.upper()}")
    try:
        return xlc.Server(params)
    except Exception as exc:
        raise EngineError(f"llama.cpp could not load {spec.model_path}: {exc}. Check that the file is a complete "
                          f"GGUF (re-run `ragserve pull` to resume a partial download)") from exc


def _gpu_build() -> bool:
    import xllamacpp as xlc

    return any("cuda" in str(d).lower() or "metal" in str(d).lower() for d in xlc.get_device_info())


def _raise_on_error(result: Any) -> dict[str, Any]:
    if isinstance(result, dict) and "error" in result:
        error = result["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code", 500) if isinstance(error, dict) else 500
        if code == 400 or "context" in message:
            raise EngineInputError(f"{message} (the model's context is too small for this input: send less text "
                                   f"or launch with a larger --n-ctx)")
        raise EngineError(message)
    return result


class LlamaChatEngine(LLMEngine):
    def __init__(self, spec: ModelSpec, metadata: dict[str, Any]):
        super().__init__(spec)
        self.metadata = metadata
        self.max_concurrency = int(spec.n_parallel or spec.options.get("n_parallel") or LLAMA_CHAT_PARALLEL)
        trained = metadata.get("context_length") or DEFAULT_CHAT_CTX
        self.n_ctx = int(spec.n_ctx or min(int(trained), DEFAULT_CHAT_CTX))
        self.chat_template = spec.options.get("chat_template") or metadata.get("chat_template")
        # Compiled once: each request renders it to know whether the prompt opens <think>.
        self.compiled_template = (compile_chat_template(self.chat_template, os.path.basename(spec.model_path))
                                  if self.chat_template else None)
        self.bos_token, self.eos_token = _special_token(metadata, "bos"), _special_token(metadata, "eos")
        self.server = _server(spec, n_ctx=self.n_ctx, n_parallel=self.max_concurrency)

    def describe(self) -> dict[str, Any]:
        family = self.metadata.get("family")
        return {"context_length": self.n_ctx, "architecture": self.metadata.get("architecture"),
                "parallel": self.max_concurrency, "chat_template": bool(self.chat_template),
                "family": family, "rule": qwen3.rule_text(family)}

    def render_prompt(self, request: GenerationRequest) -> str:
        """The prompt llama.cpp builds from the chat template (the launch option or the GGUF's own)."""
        if request.messages is None:
            return request.prompt or ""
        if not self.chat_template:
            raise EngineInputError(f"{os.path.basename(self.spec.model_path)} has no chat template: use "
                                   f"/v1/completions with a prompt, or a chat/instruct model")
        return render_chat_template(self.compiled_template, request.messages, bos_token=self.bos_token,
                                    eos_token=self.eos_token, **request.chat_template_kwargs)

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
        if request.messages is not None:
            if not self.chat_template:
                raise EngineInputError(f"{os.path.basename(self.spec.model_path)} has no chat template: use "
                                       f"/v1/completions with a prompt, or a chat/instruct model")
            payload["messages"] = request.messages
            if request.chat_template_kwargs:
                payload["chat_template_kwargs"] = request.chat_template_kwargs
        else:
            payload["prompt"] = request.prompt
        for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(request, key)
            if value is not None:
                payload[key] = value
        payload["n_predict"] = request.max_tokens if request.max_tokens is not None else -1
        if request.stop:
            payload["stop"] = request.stop
        return payload

    def generate(self, request: GenerationRequest) -> Iterator[GenerationDelta]:
        payload = self._payload(request)
        handler = (self.server.handle_chat_completions if request.messages is not None
                   else self.server.handle_completions)
        pieces: queue.Queue = queue.Queue()
        done = object()
        cancelled = threading.Event()

        def on_chunk(chunk: dict[str, Any]) -> Optional[bool]:
            pieces.put(chunk)
            return True if cancelled.is_set() else None  # True tells llama.cpp to stop this sequence

        def run() -> None:
            try:
                result = handler(payload, on_chunk)
                if isinstance(result, dict) and "error" in result:
                    pieces.put(result)
            except Exception as exc:  # surfaced in the consumer
                pieces.put(exc)
            finally:
                pieces.put(done)

        threading.Thread(target=run, daemon=True, name="llama-generate").start()
        finish_reason = None
        prompt_tokens = completion_tokens = None
        try:
            while True:
                item = pieces.get()
                if item is done:
                    break
                if isinstance(item, Exception):
                    raise EngineError(f"llama.cpp generation failed: {item}")
                _raise_on_error(item)
                if item.get("usage"):
                    prompt_tokens = item["usage"].get("prompt_tokens")
                    completion_tokens = item["usage"].get("completion_tokens")
                for choice in item.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    if text:
                        yield GenerationDelta(text=text)
        finally:
            # Closed early (client gone): stop generating at the next token instead of running on.
            cancelled.set()
        yield GenerationDelta(finish_reason=finish_reason or "stop", prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens)


def _qwen3_embedding_eos(spec: ModelSpec, metadata: dict[str, Any]) -> str:
    """Qwen3-Embedding pools the hidden state of <|endoftext|> closing every text. The official GGUFs
    leave it to the caller (their tokenizer adds no EOS), so the engine appends it as text, which
    llama.cpp parses as the special token; a GGUF that adds it itself gets nothing extra."""
    tokens, fields = metadata.get("tokens") or [], metadata["fields"]
    if "<|endoftext|>" not in tokens:
        raise EngineError(f"{spec.model_path} is a Qwen3-Embedding GGUF without <|endoftext|> in its vocabulary, "
                          f"so its last-token pooling cannot be applied: convert it again from the official repo")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    adds_eos = fields.get("tokenizer.ggml.add_eos_token") and isinstance(eos, int) and eos < len(tokens)
    return "" if adds_eos and tokens[eos] == "<|endoftext|>" else "<|endoftext|>"


class LlamaEmbeddingEngine(EmbeddingEngine):
    def __init__(self, spec: ModelSpec, metadata: dict[str, Any]):
        super().__init__(spec)
        self.metadata = metadata
        self.family = metadata.get("family")
        self.supports_dimensions = self.family == qwen3.Family.EMBEDDING
        self.eos_suffix = _qwen3_embedding_eos(spec, metadata) if self.supports_dimensions else ""
        trained = int(metadata.get("context_length") or DEFAULT_EMBED_CTX)
        self.n_ctx = int(spec.n_ctx or min(trained, DEFAULT_EMBED_CTX))
        pooling = spec.options.get("pooling") or ("last" if self.family == "qwen3-embedding" else None)
        self.server = _server(spec, n_ctx=self.n_ctx, n_parallel=1, embedding=True, pooling=pooling)
        self._dimensions = len(self._embed_raw(["dimension probe"])[0][0])

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def describe(self) -> dict[str, Any]:
        return {"dimensions": self._dimensions, "context_length": self.n_ctx, "family": self.family,
                "rule": qwen3.rule_text(self.family), "supports_dimensions": self.supports_dimensions,
                "architecture": self.metadata.get("architecture")}

    def _embed_raw(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        result = _raise_on_error(self.server.handle_embeddings({"input": list(texts), "encoding_format": "float"}))
        data = sorted(result["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in data], int(result.get("usage", {}).get("prompt_tokens", 0))

    def embed(self, texts: Sequence[str], *, is_query: bool = False, instruction: Optional[str] = None,
              should_stop: Optional[ShouldStop] = None) -> EmbeddingOutput:
        if self.family == qwen3.Family.EMBEDDING:
            texts = qwen3.embedding_inputs(texts, is_query=is_query, instruction=instruction,
                                           default_task=self.spec.options.get("embedding_task"))
        elif instruction:  # no family rule: the instruction is a prefix, as the other engines apply it
            texts = [f"{instruction}{t}" for t in texts]
        texts = [t + self.eos_suffix for t in texts]
        vectors: list[list[float]] = []
        tokens = 0
        # One slot embeds one text at a time anyway: calls of max_batch_size texts give the same
        # vectors and let a call whose callers have all gone stop between them.
        for start in range(0, len(texts), self.max_batch_size):
            rerank_fit.check_stop(should_stop)
            part, part_tokens = self._embed_raw(texts[start:start + self.max_batch_size])
            vectors += part
            tokens += part_tokens
        return EmbeddingOutput(vectors=vectors, prompt_tokens=tokens)


def load(spec: ModelSpec):
    from ragserve.engines.gguf_meta import GGUFFormatError

    try:
        metadata = _read_gguf_metadata(spec.model_path)
    except GGUFFormatError as exc:  # its message names the file and the fix
        raise EngineError(str(exc)) from exc
    if spec.model_type == ModelType.LLM:
        return LlamaChatEngine(spec, metadata)
    if spec.model_type == ModelType.EMBEDDING:
        return LlamaEmbeddingEngine(spec, metadata)
    from ragserve.engines.llama_rerank import LlamaRerankEngine

    return LlamaRerankEngine(spec, metadata)
