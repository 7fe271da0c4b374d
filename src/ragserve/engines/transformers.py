"""The transformers engine: Hugging Face folders run with PyTorch, one model per worker.

- Chat (LLM): any causal LM with a chat template. Text streams out as it is generated
  (generate() runs in a thread; a streamer hands text out token by token); stop strings, max_tokens,
  temperature (0 = greedy), top_p, seed and chat_template_kwargs (Qwen3's enable_thinking)
  are honoured. `<think>` text is passed through: the worker splits it with
  ragserve.engines.reasoning. presence/frequency penalties have no transformers equivalent
  and are ignored.
- Embedding: Qwen3-Embedding's recipe (query instruction prefix for queries only, EOS
  appended, left padding, last-token pooling, L2 normalisation; Matryoshka-trained, so
  `dimensions` may cut it). Other folders get mean pooling and L2 normalisation.
- Rerank: Qwen3-Reranker's recipe: the judging prompt over (instruction, query, document),
  score = softmax([logit("no"), logit("yes")])[1] at the last position, batched.

Left-padded batches get explicit position ids (counting real tokens only), so a text scores
the same alone or in any batch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import qwen3, rerank_fit
from ragserve.engines.base import (
    EmbeddingEngine,
    EmbeddingOutput,
    Engine,
    EngineError,
    EngineInputError,
    GenerationDelta,
    GenerationRequest,
    LLMEngine,
    RerankEngine,
    RerankOutput,
    ShouldStop,
)

DEFAULT_THREADS = 2
from ragserve.engines.defaults import TORCH_MAX_LENGTH as DEFAULT_MAX_LENGTH


def load(spec: ModelSpec) -> Engine:
    folder = _check_folder(spec.model_path)
    try:
        detected = qwen3.detect_hf_folder(folder)
        mismatch = qwen3.model_type_mismatch(folder, spec.model_type.value)
    except ValueError as exc:  # a damaged config file: its message names the file and the fix
        raise EngineError(str(exc)) from exc
    if mismatch:
        raise EngineError(mismatch)
    _configure_torch(spec)
    if spec.model_type == ModelType.LLM:
        return TransformersChat(spec, detected)
    if spec.model_type == ModelType.EMBEDDING:
        return TransformersEmbedding(spec, detected)
    return TransformersRerank(spec, detected)


def _check_folder(model_path: str) -> Path:
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise EngineError(f"{path} is a GGUF file; the transformers engine loads Hugging Face folders: "
                          "launch it with --model-engine llama.cpp")
    if not path.is_dir():
        raise EngineError(f"model path {path} is not a folder: give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise EngineError(f"{path} has no config.json, so it is not a Hugging Face model folder: "
                          "check --model-path (a download may be incomplete)")
    return path


def _configure_torch(spec: ModelSpec) -> None:
    import torch

    # The launch option wins, then the share the server planned for this worker (control/threads.py).
    threads = spec.options.get("n_threads") or os.environ.get("RAGSERVE_THREADS") or DEFAULT_THREADS
    torch.set_num_threads(int(threads))


def _device(spec: ModelSpec) -> str:
    import torch

    return str(spec.options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def _dtype(spec: ModelSpec, device: str):
    import torch

    name = spec.options.get("torch_dtype")
    if name in (None, "", "auto"):
        # float32 on CPU keeps scores exact and fast enough; half precision belongs on a GPU.
        return torch.float32 if device == "cpu" else (torch.bfloat16 if name is None else "auto")
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}[str(name).lower()]
    except KeyError:
        raise EngineError(f"unknown torch_dtype {name!r}: use float32, bfloat16, float16 or auto") from None


def _load_tokenizer(folder: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a load error for the user
        raise EngineError(f"cannot load the tokenizer from {folder}: {exc}") from exc


def _load_model(auto_class, folder: Path, spec: ModelSpec):
    device = _device(spec)
    try:
        model = auto_class.from_pretrained(folder, dtype=_dtype(spec, device))
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"cannot load model weights from {folder}: {exc}") from exc
    return model.to(device).eval()


def _max_length(spec: ModelSpec, config) -> int:
    trained = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return int(min(spec.n_ctx or trained, trained))


def _left_pad(sequences: list[list[int]], pad_id: int, device: str):
    """Left-pad id lists; position ids count real tokens only, as if each sequence ran alone."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


class TransformersEmbedding(EmbeddingEngine):
    def __init__(self, spec: ModelSpec, detected: dict[str, Any]) -> None:
        super().__init__(spec)
        from transformers import AutoModel

        folder = Path(spec.model_path)
        self.family = detected.get("family")
        self.is_qwen3 = self.family == qwen3.Family.EMBEDDING
        self.pooling = "last_token" if self.is_qwen3 else "mean"
        self.supports_dimensions = self.is_qwen3
        self.max_batch_size = int(spec.options.get("max_batch_size", self.max_batch_size))
        self.tokenizer = _load_tokenizer(folder)
        self.model = _load_model(AutoModel, folder, spec)
        self.device = str(self.model.device)
        self.max_length = _max_length(spec, self.model.config)
        self.default_task = spec.options.get("embedding_task")
        self.pad_id = self._pad_id()
        # Qwen3-Embedding is trained with <|endoftext|> closing every text; newer tokenizer
        # files append it themselves, older ones leave it to the caller.
        self.eos_id = self._eos_to_append() if self.is_qwen3 else None

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        return {"engine": "transformers", "family": self.family, "rule": qwen3.rule_text(self.family),
                "pooling": self.pooling, "normalized": True, "dimensions": self.dimensions,
                "supports_dimensions": self.supports_dimensions, "max_length": self.max_length}

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id, 0):
            if isinstance(candidate, int) and candidate >= 0 and candidate != tok.unk_token_id:
                return candidate
        return 0

    def _eos_to_append(self) -> int | None:
        eos = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if not isinstance(eos, int) or eos == self.tokenizer.unk_token_id:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return None
        probe = self.tokenizer("probe")["input_ids"]
        return None if probe and probe[-1] == eos else eos

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        reserve = 1 if self.eos_id is not None else 0
        encoded = self.tokenizer(list(texts), padding=False, truncation=True,
                                 max_length=self.max_length - reserve)["input_ids"]
        if self.eos_id is not None:
            encoded = [ids + [self.eos_id] for ids in encoded]
        return encoded

    def embed(self, texts: Sequence[str], *, is_query: bool = False, instruction: str | None = None,
              should_stop: ShouldStop | None = None) -> EmbeddingOutput:
        import torch

        if not texts:
            return EmbeddingOutput(vectors=[], prompt_tokens=0)
        if self.is_qwen3:
            texts = qwen3.embedding_inputs(texts, is_query=is_query, instruction=instruction or None,
                                           default_task=self.default_task)
        elif instruction:
            texts = [f"{instruction}{t}" for t in texts]
        encoded = self._encode(texts)
        # Similar lengths in one batch waste less compute on padding.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        vectors: list[list[float] | None] = [None] * len(encoded)
        with torch.inference_mode():
            for batch in _batches(order, self.max_batch_size):
                rerank_fit.check_stop(should_stop)
                ids, mask, positions = _left_pad([encoded[i] for i in batch], self.pad_id, self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
                if self.pooling == "last_token":
                    pooled = hidden[:, -1]  # left padding puts every text's last token here
                else:
                    weights = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
                for row, index in enumerate(batch):
                    vectors[index] = pooled[row].tolist()
        return EmbeddingOutput(vectors=vectors, prompt_tokens=sum(len(e) for e in encoded))


class TransformersRerank(RerankEngine):
    def __init__(self, spec: ModelSpec, detected: dict[str, Any]) -> None:
        super().__init__(spec)
        from transformers import AutoModelForCausalLM

        folder = Path(spec.model_path)
        if detected.get("family") != qwen3.Family.RERANKER:
            raise EngineError(
                f"the transformers engine reranks with the Qwen3-Reranker rule, which needs a Qwen3 causal LM; "
                f"{folder} is not one ({detected.get('reason')}). For a cross-encoder use "
                "--model-engine sentence_transformers")
        self.max_batch_size = int(spec.options.get("max_batch_size", self.max_batch_size))
        self.tokenizer = _load_tokenizer(folder)
        self.model = _load_model(AutoModelForCausalLM, folder, spec)
        self.device = str(self.model.device)
        self.max_length = _max_length(spec, self.model.config)
        self.default_instruction = spec.options.get("rerank_instruction")
        self.yes_id, self.no_id = self._yes_no_ids()
        self.prefix_ids = self.tokenizer.encode(qwen3.RERANK_PREFIX, add_special_tokens=False)
        self.suffix_ids = self.tokenizer.encode(qwen3.RERANK_SUFFIX, add_special_tokens=False)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def _yes_no_ids(self) -> tuple[int, int]:
        ids = []
        for word in ("yes", "no"):
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) != 1:
                raise EngineError(f"{self.spec.model_path}: {word!r} is not a single token in this tokenizer, "
                                  "so the Qwen3 reranker rule (P(yes) vs P(no)) does not apply")
            ids.append(encoded[0])
        return ids[0], ids[1]

    def describe(self) -> dict[str, Any]:
        return {"engine": "transformers", "family": qwen3.Family.RERANKER, "rerank_rule": "yes_no",
                "rule": qwen3.rule_text(qwen3.Family.RERANKER), "max_length": self.max_length}

    def rerank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
               should_stop: ShouldStop | None = None) -> RerankOutput:
        import torch

        if not documents:
            return RerankOutput(scores=[], prompt_tokens=0, token_counts=[], truncated=[])
        instruction = instruction or self.default_instruction
        encoded, truncated = self._rerank_inputs(query, documents, instruction)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores: list[float] = [0.0] * len(encoded)
        with torch.inference_mode():
            for batch in _batches(order, self.max_batch_size):
                rerank_fit.check_stop(should_stop)
                ids, mask, positions = _left_pad([encoded[i] for i in batch], self.pad_id, self.device)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    logits_to_keep=1).logits[:, -1, :].float()
                pair = torch.stack([logits[:, self.no_id], logits[:, self.yes_id]], dim=1)
                yes = torch.softmax(pair, dim=1)[:, 1]
                for row, index in enumerate(batch):
                    scores[index] = float(yes[row])
        rerank_fit.report(truncated, self.max_length, self.spec.model_name)
        counts = [len(e) for e in encoded]
        return RerankOutput(scores=scores, prompt_tokens=sum(counts), token_counts=counts, truncated=truncated)

    def _rerank_inputs(self, query: str, documents: Sequence[str],
                       instruction: str | None) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each judging prompt, and which pairs were cut to fit max_length.

        As the model card does: the pair (instruction, query, document) is tokenized whole and cut to
        the room the prompt frame leaves; the frame around it never is. The query must leave room.
        """
        room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        empty = self.tokenizer.encode(qwen3.rerank_pair_text(query, "", instruction), add_special_tokens=False)
        rerank_fit.check_room(len(self.prefix_ids) + len(empty) + len(self.suffix_ids), self.max_length,
                              fix="launch the model with a larger --n-ctx (up to its trained length)")
        pairs = [qwen3.rerank_pair_text(query, doc, instruction) for doc in documents]
        bodies = self.tokenizer(pairs, padding=False, truncation=False, add_special_tokens=False,
                                verbose=False)["input_ids"]
        encoded = [self.prefix_ids + body[:room] + self.suffix_ids for body in bodies]
        return encoded, [len(body) > room for body in bodies]


class TransformersChat(LLMEngine):
    max_concurrency = 1

    def __init__(self, spec: ModelSpec, detected: dict[str, Any]) -> None:
        super().__init__(spec)
        from transformers import AutoModelForCausalLM

        folder = Path(spec.model_path)
        self.family = detected.get("family")
        self.tokenizer = _load_tokenizer(folder)
        self.model = _load_model(AutoModelForCausalLM, folder, spec)
        self.device = str(self.model.device)
        self.context_length = _max_length(spec, self.model.config)
        # generate() is not re-entrant and seeds are global: one request at a time.
        self._lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

    def describe(self) -> dict[str, Any]:
        return {"engine": "transformers", "family": self.family, "rule": qwen3.rule_text(self.family),
                "context_length": self.context_length, "chat_template": bool(self.tokenizer.chat_template)}

    def render_prompt(self, request: GenerationRequest) -> str:
        """The text the model continues: the chat template applied to messages, or the raw prompt."""
        if request.messages is None:
            return request.prompt or ""
        if not self.tokenizer.chat_template:
            raise EngineInputError(f"{self.spec.model_name} has no chat template; use /v1/completions with a prompt")
        try:
            return self.tokenizer.apply_chat_template(
                request.messages, tokenize=False, add_generation_prompt=True, **request.chat_template_kwargs)
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise EngineInputError(f"the chat template rejected these messages: {exc}") from exc

    def generate(self, request: GenerationRequest) -> Iterator[GenerationDelta]:
        prompt = self.render_prompt(request)
        # A chat template writes its own special tokens; a raw prompt gets the tokenizer's.
        prompt_ids = self.tokenizer(prompt, add_special_tokens=request.messages is None)["input_ids"]
        if not prompt_ids:
            raise EngineInputError("the prompt is empty")
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise EngineInputError(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                                   f"{self.context_length}: shorten the conversation")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise EngineInputError("max_tokens must be at least 1")
        max_new = min(request.max_tokens or room, room)
        with self._lock:
            yield from self._generate(prompt_ids, max_new, request)

    def _generate(self, prompt_ids: list[int], max_new: int,
                  request: GenerationRequest) -> Iterator[GenerationDelta]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop_event = threading.Event()

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        streamer = _TokenTextStreamer(self.tokenizer, prompt_len=len(prompt_ids))
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([prompt_ids], device=self.device),
            "attention_mask": torch.ones((1, len(prompt_ids)), dtype=torch.long, device=self.device),
            "max_new_tokens": max_new, "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenAsked()]),
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else next(iter(self.eos_ids), None),
        }
        if request.temperature is not None and request.temperature <= 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif request.temperature is not None or request.top_p is not None:
            kwargs["do_sample"] = True
            if request.temperature is not None:
                kwargs["temperature"] = request.temperature
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
        if request.seed is not None:
            torch.manual_seed(request.seed)

        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["output"] = self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, name="transformers-generate", daemon=True)
        thread.start()
        stops = [s for s in request.stop if s]
        held = ""  # text that may be the start of a stop string
        finish_reason = None
        try:
            for piece in streamer:
                if finish_reason:
                    continue  # drain what the model produced before it saw the stop request
                held += piece
                cut = _earliest_stop(held, stops)
                if cut is not None:
                    if cut:
                        yield GenerationDelta(text=held[:cut])
                    held, finish_reason = "", "stop"
                    stop_event.set()
                    continue
                keep = _stop_prefix_len(held, stops)
                if len(held) > keep:
                    yield GenerationDelta(text=held[:len(held) - keep])
                    held = held[len(held) - keep:]
        finally:
            stop_event.set()
            thread.join()
        if "error" in result:
            raise EngineError(f"generation failed: {result['error']}") from result["error"]
        if held:
            yield GenerationDelta(text=held)
        generated = result["output"][0, len(prompt_ids):].tolist()
        if finish_reason is None:
            ended_on_eos = bool(generated) and generated[-1] in self.eos_ids
            finish_reason = "length" if len(generated) >= max_new and not ended_on_eos else "stop"
        yield GenerationDelta(text="", finish_reason=finish_reason, prompt_tokens=len(prompt_ids),
                              completion_tokens=len(generated))


class _TokenTextStreamer:
    """Hands decoded text to the consumer token by token (transformers' TextIteratorStreamer
    waits for a word boundary); holds back only an unfinished multi-byte character."""

    def __init__(self, tokenizer, prompt_len: int) -> None:
        import queue

        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.queue: "queue.Queue[str | None]" = queue.Queue()
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.seen_prompt = False

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if not self.seen_prompt:  # generate() first puts the whole prompt
            self.seen_prompt = True
            if len(ids) == self.prompt_len:
                return
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)
        self.queue.put(None)

    def __iter__(self):
        while True:
            piece = self.queue.get()
            if piece is None:
                return
            yield piece


def _earliest_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(text), len(stop) - 1), best, -1):
            if stop.startswith(text[-size:]):
                best = size
                break
    return best
