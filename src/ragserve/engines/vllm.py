"""vLLM on NVIDIA GPUs: chat, embedding and rerank through vLLM's own OpenAI-compatible server.

The engine runs `vllm serve MODEL ...` (vLLM's documented command: the `vllm` console script
that vLLM's package declares) as a child process on a free loopback port and talks to it over
HTTP. vLLM's in-process Python API and its internal module layout change between releases
(`python -m vllm.entrypoints.openai.api_server` became an alias module that may not serve),
while the `vllm serve` command and the HTTP protocol are what vLLM keeps stable; the child
also keeps CUDA, NCCL and vLLM's engine processes out of the worker, so a CUDA crash shows up
as a child exit with a log.

What the engine adds on top of vLLM:
  - flags from the spec (n_ctx, gpu_memory_utilization, tensor_parallel_size, dtype...), with
    `--runner pooling --convert ...` on vLLM >= 0.10 and `--task ...` before it; the argument
    list is built by `vllm_command.serve_command` (pure), which scripts/check-vllm.sh feeds to vLLM's own parser;
  - Qwen3 recipes: the query instruction for Qwen3-Embedding and the judging prompt for
    Qwen3-Reranker (with the hf_overrides that turn its yes/no logits into a classifier), so
    scores follow the model cards exactly as the transformers and llama.cpp engines do;
  - long rerank documents cut to max_model_len (rerank_fit's rule, counted with the model's own
    tokenizer) before vLLM sees them, since vLLM refuses an over-long pair with a 400;
  - the chat prompt as vLLM renders it (/tokenize, /detokenize), so reasoning opened by the
    chat template is split like on every other engine;
  - a launch error that carries the command, the child's last log lines and the fix;
  - the child never outlives the worker, even when the worker is killed; its API key travels
    in the environment (VLLM_API_KEY), never in argv or the log.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import httpx

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import qwen3, rerank_fit
from ragserve.engines.base import (EmbeddingEngine, EmbeddingOutput, EngineError, EngineInputError,
                                   GenerationDelta, GenerationRequest, LLMEngine, RerankEngine, RerankOutput,
                                   ShouldStop)
from ragserve.engines.qwen3 import Family
from ragserve.engines.vllm_command import hf_tokenizer, model_family, qwen3_eos_suffix, serve_command, vllm_version

DEFAULT_LOAD_TIMEOUT_S = 1800.0  # a 14B model from a network disk can take many minutes
LOG_TAIL_LINES = 40
ERROR_TAIL_LINES = 20
_FIX_CONTEXT = "launch with a larger --n-ctx (vLLM's max_model_len)"
# vLLM schedules sequences continuously: the worker may hand it many requests at once.
DEFAULT_LLM_CONCURRENCY = 64

# The child runs vLLM's `vllm` console script in-process after starting a watchdog thread: if
# the worker dies without closing the engine (kill -9, the gateway's parent watch calling
# os._exit), the child is re-parented, notices, and takes its whole process group (vLLM's
# engine-core and tensor-parallel processes) down with it, so no orphan keeps holding GPU memory.
# The script is found the way pip's generated `vllm` file finds it: vLLM's console_scripts entry.
_CHILD_BOOTSTRAP = """
import os, signal, sys, threading, time
from importlib.metadata import entry_points
parent = int(os.environ.pop("RAGSERVE_VLLM_PARENT_PID"))
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGTERM)
    time.sleep(15.0)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
(script,) = entry_points(group="console_scripts", name="vllm")
sys.argv = ["vllm", *sys.argv[1:]]
sys.exit(script.load()())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_hint(log_tail: str, code: int) -> str:
    text = log_tail.lower()
    # Matched on vLLM's failure messages only: its normal start-up log talks about the KV cache too.
    memory_errors = ("out of memory", "outofmemoryerror", "larger than the available kv cache memory",
                     "larger than the maximum number of tokens that can be stored in kv cache",
                     "no available memory for the cache blocks", "less than desired gpu memory utilization")
    if any(marker in text for marker in memory_errors):
        return ("the GPU ran out of memory: launch with a smaller --n-ctx (vLLM's max_model_len), a lower "
                "options.gpu_memory_utilization if other processes use this GPU, options.tensor_parallel_size "
                "to split across GPUs, or a smaller or quantized (AWQ/GPTQ/FP8) model")
    if "no cuda gpus" in text or "cuda driver" in text or "failed to infer device type" in text \
            or "nvidia driver" in text:
        return "vLLM needs an NVIDIA GPU with a working CUDA driver: on this machine use the llama.cpp or " \
               "transformers engine"
    if "address already in use" in text:
        return "the port was taken between choosing and binding it: launch the model again"
    if "unrecognized arguments" in text or "error: argument" in text:
        return "this vLLM version does not accept a flag ragserve passed: check options.extra_args, or upgrade vllm"
    if "trust_remote_code" in text or "trust-remote-code" in text:
        return "the model ships custom code: launch with options trust_remote_code=true if you trust it"
    if code == 0:
        return "the `vllm` command ended without serving: run the command below by hand to see why"
    return "see vLLM's log lines below"


class VllmServer:
    """The vLLM child process: start, wait for /health, keep its log tail, stop."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.port = _free_port()
        # Other users on a shared GPU server must not reach the model. vLLM reads the key from
        # VLLM_API_KEY, so it stays out of argv (visible in `ps`) and out of vLLM's args log line.
        self.api_key = secrets.token_hex(24)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.closing = False
        vllm_version()  # no vllm package (or no `vllm` command in it): a clear error, not a child traceback
        args = serve_command(spec, port=self.port)
        self.command = shlex.join(["vllm", *args])
        env = {**os.environ, "RAGSERVE_VLLM_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1",
               "VLLM_API_KEY": self.api_key}
        home = os.environ.get("RAGSERVE_HOME")
        if home:  # keep vLLM's compile and config caches in the home, not in ~/.cache
            env.setdefault("VLLM_CACHE_ROOT", str(Path(home) / "cache" / "vllm"))
            env.setdefault("VLLM_CONFIG_ROOT", str(Path(home) / "cache" / "vllm-config"))
        print(f"vllm: starting {self.command}", file=sys.stderr, flush=True)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOTSTRAP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            raise EngineError(f"could not start vLLM ({exc}); command: {self.command}") from exc
        threading.Thread(target=self._pump_log, daemon=True, name="vllm-log").start()
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"},
                                 timeout=httpx.Timeout(float(spec.options.get("request_timeout", 600)), connect=10),
                                 # one connection per concurrent stream: vLLM, not the pool, decides the batch
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        atexit.register(self.stop)

    def _pump_log(self) -> None:
        """Forward the child's output to the worker log (the user's one place to look) and keep a tail."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            print(f"vllm| {line}", file=sys.stderr, flush=True)

    def log_tail(self, lines: int = ERROR_TAIL_LINES) -> str:
        return "\n".join(list(self.tail)[-lines:]) or "(vLLM wrote nothing)"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                time.sleep(0.3)  # let the log pump read the last lines
                tail = self.log_tail()
                raise EngineError(f"vLLM exited with code {code} before serving {self.spec.model_path}: "
                                  f"{_launch_hint(tail, code)}. Command: {self.command}\n"
                                  f"Last vLLM log lines:\n{tail}")
            try:
                # vLLM binds its port before the model is loaded; only a 200 means it serves.
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise EngineError(f"vLLM did not become ready within {timeout:.0f} s (options.load_timeout raises the "
                          f"limit). Command: {self.command}\nLast vLLM log lines:\n{tail}")

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise self.connection_error(exc) from exc
        if response.status_code >= 400:
            raise self.http_error(response.status_code, response.text, path)
        return response.json()

    def connection_error(self, exc: Exception) -> EngineError:
        code = self.process.poll()
        if code is not None:
            return EngineError(f"the vLLM server process exited (code {code}): the worker restarts it. Last vLLM "
                               f"log lines:\n{self.log_tail()}")
        return EngineError(f"vLLM did not answer ({type(exc).__name__}: {exc})")

    @staticmethod
    def http_error(status: int, body: str, path: str) -> EngineError:
        try:
            data = json.loads(body)
            # Older vLLM answers {"object": "error", "message": ...}, newer {"error": {"message": ...}}.
            error = data.get("error", data)
            message = error.get("message", body) if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = body
        if status == 400:
            if "context length" in message or "max_model_len" in message or "too long" in message:
                message += " (send less text, or launch with a larger --n-ctx)"
            return EngineInputError(message)
        return EngineError(f"vLLM answered {status} on {path}: {message}")

    def get(self, path: str) -> dict[str, Any]:
        try:
            response = self.http.get(path)
            response.raise_for_status()
            return response.json()
        except httpx.HTTPError as exc:
            raise self.connection_error(exc) from exc

    def watch(self) -> None:
        """After load: a vLLM that dies (CUDA error, killed) leaves the worker useless, so end the worker
        too; the supervisor then restarts it, which starts a fresh vLLM."""
        def run() -> None:
            code = self.process.wait()
            if not self.closing:
                print(f"vllm: the vLLM server exited with code {code}; stopping this worker so it is restarted",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=run, daemon=True, name="vllm-watch").start()

    def stop(self) -> None:
        self.closing = True
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # vLLM and its engine-core processes
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.http.close()


def _start(spec: ModelSpec) -> VllmServer:
    server = VllmServer(spec)
    timeout = float(spec.options.get("load_timeout") or os.environ.get("RAGSERVE_LOAD_TIMEOUT")
                    or DEFAULT_LOAD_TIMEOUT_S)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


class _VllmEngine:
    """Shared by the three engine classes: the child server and its /v1/models facts."""

    server: VllmServer
    family: Optional[Family] = None

    def _start_server(self, spec: ModelSpec) -> None:
        self.server = _start(spec)
        models = self.server.get("/v1/models").get("data") or [{}]
        self.max_model_len = models[0].get("max_model_len")

    def _facts(self) -> dict[str, Any]:
        return {"engine": "vllm", "context_length": self.max_model_len, "family": self.family,
                "rule": qwen3.rule_text(self.family), "vllm_pid": self.server.process.pid}

    def close(self) -> None:
        self.server.stop()


class VllmChatEngine(_VllmEngine, LLMEngine):
    def __init__(self, spec: ModelSpec) -> None:
        LLMEngine.__init__(self, spec)
        self.max_concurrency = int(spec.n_parallel or spec.options.get("max_num_seqs") or DEFAULT_LLM_CONCURRENCY)
        self._start_server(spec)
        self.server.watch()

    def describe(self) -> dict[str, Any]:
        return {**self._facts(), "parallel": self.max_concurrency}

    def render_prompt(self, request: GenerationRequest) -> str:
        """The prompt exactly as vLLM renders it: its chat template (or --chat-template) on the messages.

        vLLM's /tokenize applies the same template as its chat route and /detokenize turns the ids
        back into text with special tokens kept, so `<think>` left open by the template shows.
        """
        if request.messages is None:
            return request.prompt or ""
        body: dict[str, Any] = {"model": self.spec.uid, "messages": request.messages, "add_generation_prompt": True}
        if request.chat_template_kwargs:
            body["chat_template_kwargs"] = request.chat_template_kwargs
        tokens = self.server.post("/tokenize", body)["tokens"]
        return self.server.post("/detokenize", {"model": self.spec.uid, "tokens": tokens})["prompt"]

    def _payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {"model": self.spec.uid, "stream": True, "stream_options": {"include_usage": True}}
        if request.messages is not None:
            path = "/v1/chat/completions"
            payload["messages"] = request.messages
            if request.chat_template_kwargs:
                payload["chat_template_kwargs"] = request.chat_template_kwargs
        else:
            path = "/v1/completions"
            payload["prompt"] = request.prompt
        for key in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(request, key)
            if value is not None:
                payload[key] = value
        if request.stop:
            payload["stop"] = request.stop
        return path, payload

    def _events(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """vLLM's stream chunks, with its in-band errors raised."""
        try:
            with self.server.http.stream("POST", path, json=payload) as response:
                if response.status_code >= 400:
                    raise self.server.http_error(response.status_code,
                                                 response.read().decode("utf-8", "replace"), path)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk or chunk.get("object") == "error":  # failures after the 200, in-band
                        error = chunk.get("error", chunk)
                        raise EngineError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
                    yield chunk
        except httpx.HTTPError as exc:
            raise self.server.connection_error(exc) from exc

    def generate(self, request: GenerationRequest) -> Iterator[GenerationDelta]:
        from ragserve.engines.reasoning import prompt_opens_reasoning

        path, payload = self._payload(request)
        finish_reason = None
        prompt_tokens = completion_tokens = None
        in_reasoning = False
        for chunk in self._events(path, payload):
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"].get("prompt_tokens", prompt_tokens)
                completion_tokens = chunk["usage"].get("completion_tokens", completion_tokens)
            for choice in chunk.get("choices") or []:
                finish_reason = choice.get("finish_reason") or finish_reason
                delta = choice.get("delta")
                if delta is None:
                    text = choice.get("text")
                else:
                    # Only a --reasoning-parser in options.extra_args makes vLLM split reasoning off:
                    # put it back in think tags so the worker splits every engine alike. A prompt
                    # that opened <think> itself gets only the closing tag, as the model wrote it.
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    text = delta.get("content")
                    if reasoning:
                        opened = in_reasoning or prompt_opens_reasoning(self.render_prompt(request))
                        text = ("" if opened else "<think>\n") + reasoning + (text or "")
                        in_reasoning = True
                    elif text and in_reasoning:
                        text, in_reasoning = "\n</think>\n\n" + text, False
                if text:
                    yield GenerationDelta(text=text)
        if in_reasoning:
            yield GenerationDelta(text="\n</think>\n\n")
        yield GenerationDelta(finish_reason=finish_reason or "stop", prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens)


class VllmEmbeddingEngine(_VllmEngine, EmbeddingEngine):
    def __init__(self, spec: ModelSpec) -> None:
        EmbeddingEngine.__init__(self, spec)
        self.family = model_family(spec)
        self.supports_dimensions = self.family == Family.EMBEDDING  # Matryoshka-trained
        self.max_batch_size = int(spec.options.get("max_batch_size", 256))
        self.eos_suffix = qwen3_eos_suffix(spec) if self.family == Family.EMBEDDING else ""
        self._start_server(spec)
        self._dimensions = len(self._embed_raw(["dimension probe"])[0][0])
        self.server.watch()

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def describe(self) -> dict[str, Any]:
        return {**self._facts(), "dimensions": self._dimensions, "supports_dimensions": self.supports_dimensions}

    def _embed_raw(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        result = self.server.post("/v1/embeddings", {"model": self.spec.uid, "input": list(texts),
                                                     "encoding_format": "float"})
        data = sorted(result["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in data], int((result.get("usage") or {}).get("prompt_tokens", 0))

    def embed(self, texts: Sequence[str], *, is_query: bool = False, instruction: Optional[str] = None,
              should_stop: Optional[ShouldStop] = None) -> EmbeddingOutput:
        if self.family == Family.EMBEDDING:
            if is_query:
                task = instruction or self.spec.options.get("embedding_task")
                texts = [qwen3.embedding_query_text(t, task) for t in texts]
            texts = [t + self.eos_suffix for t in texts]
        vectors: list[list[float]] = []
        tokens = 0
        # vLLM embeds each text on its own: posting max_batch_size texts at a time changes no vector,
        # and lets a call whose callers have all gone stop between posts.
        for start in range(0, len(texts), self.max_batch_size):
            rerank_fit.check_stop(should_stop)
            chunk_vectors, chunk_tokens = self._embed_raw(texts[start:start + self.max_batch_size])
            vectors += chunk_vectors
            tokens += chunk_tokens
        return EmbeddingOutput(vectors=vectors, prompt_tokens=tokens)


class VllmRerankEngine(_VllmEngine, RerankEngine):
    """vLLM refuses a pair longer than max_model_len (400), so over-long documents are cut here first
    (rerank_fit's rule), counted with the model's own tokenizer the way vLLM tokenizes the pair."""

    def __init__(self, spec: ModelSpec) -> None:
        RerankEngine.__init__(self, spec)
        self.max_batch_size = int(spec.options.get("max_batch_size", 256))
        self.family = model_family(spec)
        self.tokenizer = hf_tokenizer(spec, "how many tokens a (query, document) pair holds")
        self._start_server(spec)
        self.limit = int(self.max_model_len or self.tokenizer.model_max_length)
        self.server.watch()

    def describe(self) -> dict[str, Any]:
        return {**self._facts(), "rerank_rule": "yes_no" if self.family else "classifier"}

    def _frame(self, query: str, instruction: Optional[str]) -> tuple[str, Callable[[str], str]]:
        """The query text vLLM gets, and what each document becomes around it."""
        if self.family is None:
            return query, lambda doc: doc
        # vLLM scores a causal-LM reranker on query + document, concatenated as text: split the
        # model card's judging prompt at that seam so the whole prompt is exactly qwen3.rerank_prompt.
        instruction = instruction or self.spec.options.get("rerank_instruction")
        head, tail = qwen3.rerank_pair_text(query, "\x00", instruction).split("\x00")
        return qwen3.RERANK_PREFIX + head, lambda doc: doc + tail + qwen3.RERANK_SUFFIX

    def _pair_tokens(self, query_text: str, doc_text: str) -> int:
        if self.family is None:  # a cross-encoder: vLLM tokenizes the text pair with its special tokens
            return len(self.tokenizer(query_text, doc_text)["input_ids"])
        return len(self.tokenizer(query_text + doc_text)["input_ids"])

    def _fit(self, query_text: str, frame: Callable[[str], str], document: str) -> tuple[str, int, bool]:
        """The document as sent (framed), its pair's tokens, and whether it was cut to its longest head."""
        total = self._pair_tokens(query_text, frame(document))
        if total <= self.limit:  # vLLM refuses only pairs longer than max_model_len
            return frame(document), total, False
        ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        head = lambda k: self.tokenizer.decode(ids[:k])  # noqa: E731
        count = lambda k: self._pair_tokens(query_text, frame(head(k)))  # noqa: E731
        keep = rerank_fit.longest_head(len(ids), count, self.limit, guess=len(ids) - (total - self.limit))
        return frame(head(keep)), count(keep), True

    def rerank(self, query: str, documents: Sequence[str], *, instruction: Optional[str] = None,
               should_stop: Optional[ShouldStop] = None) -> RerankOutput:
        if not documents:
            return RerankOutput(scores=[], prompt_tokens=0, token_counts=[], truncated=[])
        query_text, frame = self._frame(query, instruction)
        rerank_fit.check_room(self._pair_tokens(query_text, frame("")), self.limit, fix=_FIX_CONTEXT)
        fitted = [self._fit(query_text, frame, doc) for doc in documents]
        scores = [0.0] * len(documents)
        tokens = 0
        for start in range(0, len(documents), self.max_batch_size):
            rerank_fit.check_stop(should_stop)
            chunk = [text for text, _, _ in fitted[start:start + self.max_batch_size]]
            result = self.server.post("/v1/rerank", {"model": self.spec.uid, "query": query_text,
                                                     "documents": chunk, "top_n": len(chunk)})
            for item in result["results"]:
                scores[start + item["index"]] = float(item["relevance_score"])
            tokens += int((result.get("usage") or {}).get("total_tokens") or 0)
        truncated = [cut for _, _, cut in fitted]
        rerank_fit.report(truncated, self.limit, self.spec.model_name)
        return RerankOutput(scores=scores, prompt_tokens=tokens, token_counts=[n for _, n, _ in fitted],
                            truncated=truncated)


def load(spec: ModelSpec):
    if spec.model_type == ModelType.LLM:
        return VllmChatEngine(spec)
    if spec.model_type == ModelType.EMBEDDING:
        return VllmEmbeddingEngine(spec)
    return VllmRerankEngine(spec)
