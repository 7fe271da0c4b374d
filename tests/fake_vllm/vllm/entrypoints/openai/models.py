"""The real small CPU models behind the stand-in vLLM server, one class per way vLLM runs a model.

  GGUFChatModel  a .gguf chat model through xllamacpp (chat template from the GGUF);
  HFChatModel    a Hugging Face causal-LM folder through transformers: its tokenizer's chat
                 template (or --chat-template), greedy at temperature 0, stops at the EOS ids
                 of generation_config.json, special tokens skipped in the output (vLLM's default);
  EmbedModel     sentence-transformers folders, or Qwen3 causal LMs by last-token pooling;
  ScoreModel     cross-encoders, Qwen3-Reranker by its yes/no logits, else cosine similarity.

Chat models also tokenize as vLLM's /tokenize and /detokenize do: the chat template rendered to
text, encoded without adding special tokens; ids decoded with special tokens kept.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Optional


def config_of(path: str) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _tokenizer(path: str, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def _causal_lm(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _chat_template(option: Optional[str]) -> Optional[str]:
    """--chat-template is a file or the template itself, as vLLM reads it."""
    if not option:
        return None
    path = Path(option)
    return path.read_text() if path.is_file() else option


class _Tokenizing:
    """/tokenize and /detokenize over a Hugging Face tokenizer, as vLLM does them."""

    tokenizer: Any
    template: Optional[str] = None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def tokenize(self, body: dict[str, Any]) -> list[int]:
        if body.get("messages") is not None:
            text = self.render(body["messages"], body.get("add_generation_prompt", True),
                               body.get("chat_template_kwargs") or {})
            return self.tokenizer(text, add_special_tokens=bool(body.get("add_special_tokens", False)))["input_ids"]
        return self.tokenizer(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


class GGUFChatModel(_Tokenizing):
    def __init__(self, args):
        import xllamacpp as xlc

        # vLLM reads a GGUF's tokenizer and template through transformers; loaded alongside the model.
        self._tokenizer_ready = threading.Event()
        threading.Thread(target=self._load_tokenizer, args=(Path(args.model),), daemon=True).start()
        self.template = _chat_template(args.chat_template)
        params = xlc.CommonParams()
        params.model.path = args.model
        self.n_ctx = args.max_model_len or 2048
        params.n_ctx = self.n_ctx
        params.n_parallel = 4
        params.kv_unified = True
        params.use_jinja = True
        if self.template:
            params.chat_template = self.template
        params.reasoning_format = xlc.common_reasoning_format.COMMON_REASONING_FORMAT_NONE
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
        params.n_gpu_layers = 0
        params.warmup = False
        self.server = xlc.Server(params)

    def _load_tokenizer(self, path: Path) -> None:
        try:
            self._tokenizer = _tokenizer(str(path.parent), gguf_file=path.name)
        finally:
            self._tokenizer_ready.set()

    @property
    def tokenizer(self):
        self._tokenizer_ready.wait()
        return self._tokenizer

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
        return self._stream(handler, payload)

    @staticmethod
    def _stream(handler, payload) -> Iterator[dict[str, Any]]:
        pieces: queue.Queue = queue.Queue()

        def produce() -> None:
            try:
                handler(payload, pieces.put)
            finally:
                pieces.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while (item := pieces.get()) is not None:
            yield item


class HFChatModel(_Tokenizing):
    def __init__(self, args):
        self.tokenizer = _tokenizer(args.model)
        self.template = _chat_template(args.chat_template)
        self.model = _causal_lm(args.model)
        self.n_ctx = args.max_model_len or int(config_of(args.model).get("max_position_embeddings") or 2048)
        generation = {}
        if (Path(args.model) / "generation_config.json").is_file():
            generation = json.loads((Path(args.model) / "generation_config.json").read_text())
        eos = generation.get("eos_token_id", config_of(args.model).get("eos_token_id"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.lock = threading.Lock()  # one generation at a time on the CPU

    def _pieces(self, ids: list[int], body: dict[str, Any]) -> Iterator[tuple[str, Optional[str], int]]:
        """(new text, finish_reason, tokens so far) per generated token; finish_reason on the last one."""
        import torch

        temperature = body.get("temperature")
        generator = torch.Generator().manual_seed(int(body.get("seed") or 0))
        limit = body.get("max_tokens") or max(1, self.n_ctx - len(ids))
        out: list[int] = []
        sent = ""
        for step in range(limit):
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            if temperature == 0:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / (temperature or 1.0), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token in self.eos_ids:
                yield "", "stop", len(out)
                return
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            for stop in body.get("stop") or []:
                if stop in text:
                    yield text[len(sent):text.index(stop)], "stop", len(out)
                    return
            if not text.endswith("\ufffd"):  # a token that ends inside a UTF-8 character waits
                yield text[len(sent):], ("length" if step == limit - 1 else None), len(out)
                sent = text
            elif step == limit - 1:
                yield "", "length", len(out)

    def run(self, body: dict[str, Any], chat: bool, stream: bool):
        if chat:
            text = self.render(body["messages"], True, body.get("chat_template_kwargs") or {})
        else:
            text = body["prompt"]
        ids = self.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        events = self._events(ids, body, chat)
        if stream:
            return events
        parts, finish, usage = [], None, None
        for item in events:
            usage = item.get("usage") or usage
            for choice in item.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": "".join(parts)}} if chat
                      else {"text": "".join(parts)})
        return {"choices": [choice], "usage": usage}

    def _events(self, ids: list[int], body: dict[str, Any], chat: bool) -> Iterator[dict[str, Any]]:
        count = 0
        with self.lock:
            for text, finish, count in self._pieces(ids, body):
                choice = {"index": 0, "finish_reason": finish}
                choice.update({"delta": {"content": text}} if chat else {"text": text})
                yield {"choices": [choice]}
        yield {"choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": count,
                                        "total_tokens": len(ids) + count}}


class EmbedModel:
    def __init__(self, args: argparse.Namespace):
        self.qwen3 = config_of(args.model).get("model_type") == "qwen3"
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
        elif any(a.endswith("ForSequenceClassification") for a in config_of(args.model).get("architectures") or []):
            from sentence_transformers import CrossEncoder

            self.cross = CrossEncoder(args.model, device="cpu")
            self.tokenizer = self.cross.tokenizer
        else:
            self.embedder = EmbedModel(args)  # no score head: cosine similarity of embeddings

    def pair_tokens(self, query: str, document: str) -> int:
        """Tokens of one scored pair, as vLLM counts it against max_model_len."""
        if self.embedder is not None:
            return max(len(self.embedder.tokenizer(text)["input_ids"]) for text in (query, document))
        if self.qwen3_yes_no:
            return len(self.tokenizer(query + document)["input_ids"])
        return len(self.tokenizer(query, document)["input_ids"])

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
