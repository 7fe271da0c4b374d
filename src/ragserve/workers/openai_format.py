"""Turn engine outputs into OpenAI / Xinference response bodies. Pure functions, no I/O."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ragserve.engines.base import GenerationDelta


def _reasoning_splitter(start_in_reasoning: bool = False):
    """Splits Qwen3-style <think>...</think> output into reasoning and content."""
    from ragserve.engines.reasoning import ReasoningSplitter

    return ReasoningSplitter(start_in_reasoning=start_in_reasoning)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: Optional[int], completion_tokens: Optional[int]) -> dict[str, int]:
    prompt, completion = prompt_tokens or 0, completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Collected:
    def __init__(self) -> None:
        self.finish_reason: Optional[str] = None
        self.prompt_tokens: Optional[int] = None
        self.completion_tokens: Optional[int] = None

    def note(self, delta: GenerationDelta) -> None:
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            self.completion_tokens = delta.completion_tokens


def chat_completion(model: str, deltas: Iterable[GenerationDelta], split_reasoning: bool,
                    start_in_reasoning: bool = False) -> dict[str, Any]:
    collected = _Collected()
    content, reasoning = [], []
    splitter = _reasoning_splitter(start_in_reasoning) if split_reasoning else None
    for delta in deltas:
        collected.note(delta)
        if splitter:
            r, c = splitter.feed(delta.text)
            reasoning.append(r)
            content.append(c)
        else:
            content.append(delta.text)
    if splitter:
        r, c = splitter.flush()
        reasoning.append(r)
        content.append(c)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if splitter and "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": collected.finish_reason or "stop",
                     "logprobs": None}],
        "usage": usage(collected.prompt_tokens, collected.completion_tokens),
    }


class UsageTrailer(dict):
    """`{"usage": {...}}` for the gateway alone, sent after a stream whose client did not ask for usage.

    The worker writes it as an SSE comment (which clients skip) and the gateway takes it out, so neither
    has to touch the stream's other chunks: asking for OpenAI's usage chunk instead would add
    `"usage": null` to every chunk, which the gateway would then have to remove, token by token.
    """


def _usage_tail(chunk_id: str, created: int, model: str, obj: str, collected: "_Collected",
                include_usage: bool, usage_trailer: bool) -> Iterator[dict[str, Any]]:
    counts = usage(collected.prompt_tokens, collected.completion_tokens)
    if include_usage:
        yield {"id": chunk_id, "object": obj, "created": created, "model": model, "choices": [], "usage": counts}
    elif usage_trailer:
        yield UsageTrailer(usage=counts)


def chat_completion_chunks(model: str, deltas: Iterable[GenerationDelta], split_reasoning: bool,
                           include_usage: bool, start_in_reasoning: bool = False,
                           usage_trailer: bool = False) -> Iterator[dict[str, Any]]:
    """OpenAI stream chunks: a role chunk, one chunk per text piece, a finish chunk, optional usage.

    Every delta has `content`, as Xinference sends it: langchain-xinference reads delta["content"] on every
    chunk (None for reasoning pieces, which it turns into ""), and fails with KeyError without it.
    """
    chunk_id, created = new_id("chatcmpl"), int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: Optional[str] = None) -> dict[str, Any]:
        body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        return body

    yield chunk({"role": "assistant", "content": ""})
    collected = _Collected()
    splitter = _reasoning_splitter(start_in_reasoning) if split_reasoning else None
    for delta in deltas:
        collected.note(delta)
        if not delta.text:
            continue
        if splitter:
            reasoning, content = splitter.feed(delta.text)
            if reasoning:
                yield chunk({"content": None, "reasoning_content": reasoning})
            if content:
                yield chunk({"content": content})
        else:
            yield chunk({"content": delta.text})
    if splitter:
        reasoning, content = splitter.flush()
        if reasoning:
            yield chunk({"content": None, "reasoning_content": reasoning})
        if content:
            yield chunk({"content": content})
    yield chunk({"content": ""}, collected.finish_reason or "stop")
    yield from _usage_tail(chunk_id, created, model, "chat.completion.chunk", collected, include_usage,
                           usage_trailer)


def text_completion(model: str, deltas: Iterable[GenerationDelta]) -> dict[str, Any]:
    collected = _Collected()
    text = []
    for delta in deltas:
        collected.note(delta)
        text.append(delta.text)
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": "".join(text), "finish_reason": collected.finish_reason or "stop",
                     "logprobs": None}],
        "usage": usage(collected.prompt_tokens, collected.completion_tokens),
    }


def text_completion_chunks(model: str, deltas: Iterable[GenerationDelta],
                           include_usage: bool, usage_trailer: bool = False) -> Iterator[dict[str, Any]]:
    chunk_id, created = new_id("cmpl"), int(time.time())
    collected = _Collected()
    for delta in deltas:
        collected.note(delta)
        if delta.text or delta.finish_reason:
            yield {"id": chunk_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": delta.text, "finish_reason": delta.finish_reason,
                                "logprobs": None}]}
    yield from _usage_tail(chunk_id, created, model, "text_completion", collected, include_usage, usage_trailer)


def cut_dimensions(vectors: np.ndarray, dimensions: Optional[int]) -> np.ndarray:
    """Matryoshka truncation: keep the first `dimensions` values, then L2-renormalise."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def embedding_list(model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(vectors):
        if encoding_format == "base64":
            encoded: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        else:
            encoded = [float(x) for x in vector]
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def rerank_result(model: str, documents: list[str], scores: list[float], prompt_tokens: int,
                  top_n: Optional[int], return_documents: Optional[bool], return_len: Optional[bool],
                  truncated: int = 0) -> dict[str, Any]:
    """Xinference's rerank shape (results + meta.tokens), with Jina/Cohere's `usage` alongside.

    `truncated`: how many documents were cut to fit the model's context, told in meta.truncated_documents.
    """
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if top_n is not None:
        order = order[:top_n]
    results = []
    for index in order:
        results.append({
            "index": index,
            "relevance_score": float(scores[index]),
            "document": {"text": documents[index]} if return_documents else None,
        })
    # A reranker generates nothing: output_tokens is 0. Xinference copies the input count into it, so
    # clients that add the two (RAGFlow's token counting reads input_tokens + output_tokens) count every
    # token twice against it.
    tokens = {"input_tokens": prompt_tokens, "output_tokens": 0} if return_len else None
    meta: dict[str, Any] = {"api_version": None, "billed_units": None, "tokens": tokens, "warnings": None}
    if truncated:
        meta["truncated_documents"] = truncated
        meta["warnings"] = [f"{truncated} of {len(documents)} documents were cut to fit the model's context"]
    return {
        "id": new_id("rerank"),
        "model": model,
        "results": results,
        "meta": meta,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
