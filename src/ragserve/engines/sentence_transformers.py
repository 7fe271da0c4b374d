"""sentence-transformers: bi-encoder embeddings and cross-encoder rerank from a local folder."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import rerank_fit
from ragserve.engines.base import (EmbeddingEngine, EmbeddingOutput, EngineError, EngineInputError, RerankEngine,
                                   RerankOutput, ShouldStop)


def _setup_torch(spec: ModelSpec) -> None:
    import torch

    threads = int(spec.options.get("n_threads") or os.environ.get("RAGSERVE_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)


def _device(spec: ModelSpec) -> str:
    import torch

    return spec.options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _token_counts(tokenizer: Any, texts: Sequence[str], max_length: Optional[int]) -> list[int]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [len(ids) for ids in encoded]


class SentenceTransformerEmbedding(EmbeddingEngine):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        from sentence_transformers import SentenceTransformer

        _setup_torch(spec)
        try:
            self.model = SentenceTransformer(spec.model_path, device=_device(spec), local_files_only=True,
                                             trust_remote_code=bool(spec.options.get("trust_remote_code", False)))
        except Exception as exc:
            raise EngineError(f"sentence-transformers could not load {spec.model_path}: {exc}") from exc
        self.max_batch_size = int(spec.options.get("batch_size", 64))
        # sentence-transformers renamed this; keep working on versions before and after the rename.
        get_dimension = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        dims = get_dimension()
        self._dimensions = int(dims)
        # Matryoshka models declare it in their card config; cutting others ruins them silently.
        self.supports_dimensions = bool(spec.options.get("matryoshka", False))
        self.prompts = dict(getattr(self.model, "prompts", {}) or {})

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def describe(self) -> dict[str, Any]:
        return {"dimensions": self._dimensions, "context_length": self.model.max_seq_length,
                "prompts": sorted(self.prompts)}

    def embed(self, texts: Sequence[str], *, is_query: bool = False, instruction: Optional[str] = None,
              should_stop: Optional[ShouldStop] = None) -> EmbeddingOutput:
        import numpy as np

        kwargs: dict[str, Any] = {}
        if instruction:
            kwargs["prompt"] = instruction
        elif is_query and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        # One encode() per batch, so that should_stop is asked between batches; longest first, as
        # encode() itself orders texts, so the batches (and their padding) stay what they were.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), self._dimensions), dtype=np.float32)
        for start in range(0, len(order), self.max_batch_size):
            rerank_fit.check_stop(should_stop)
            chunk = order[start:start + self.max_batch_size]
            vectors[chunk] = self.model.encode([texts[i] for i in chunk], batch_size=self.max_batch_size,
                                               convert_to_numpy=True, show_progress_bar=False, **kwargs)
        prefix = kwargs.get("prompt") or self.prompts.get(kwargs.get("prompt_name", ""), "")
        counts = _token_counts(self.model.tokenizer, [prefix + t for t in texts], self.model.max_seq_length)
        return EmbeddingOutput(vectors=vectors.tolist(), prompt_tokens=sum(counts), token_counts=counts)


class CrossEncoderRerank(RerankEngine):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        from sentence_transformers import CrossEncoder

        _setup_torch(spec)
        try:
            self.model = CrossEncoder(spec.model_path, device=_device(spec), local_files_only=True,
                                      trust_remote_code=bool(spec.options.get("trust_remote_code", False)))
        except Exception as exc:
            raise EngineError(f"sentence-transformers could not load {spec.model_path} as a cross-encoder: {exc}") \
                from exc
        self.max_batch_size = int(spec.options.get("batch_size", 32))

    def describe(self) -> dict[str, Any]:
        return {"context_length": self._max_length(), "num_labels": self.model.num_labels,
                "max_batch_size": self.max_batch_size}

    def _max_length(self) -> int | None:
        # `max_length` became `max_seq_length` in sentence-transformers 6; read whichever exists.
        return getattr(self.model, "max_seq_length", None) or getattr(self.model, "max_length", None)

    def rerank(self, query: str, documents: Sequence[str], *, instruction: Optional[str] = None,
               should_stop: Optional[ShouldStop] = None) -> RerankOutput:
        if instruction:
            raise EngineInputError("a cross-encoder scores (query, document) pairs as it was trained, with no "
                                   "instruction: leave `instruction` out")
        texts, truncated = self._fit(query, documents)
        scores: list[float] = []
        for start in range(0, len(texts), self.max_batch_size):  # should_stop is asked between batches
            rerank_fit.check_stop(should_stop)
            chunk = [(query, doc) for doc in texts[start:start + self.max_batch_size]]
            # predict() applies the model's activation (sigmoid for one-label heads): scores in [0, 1].
            out = self.model.predict(chunk, batch_size=self.max_batch_size, convert_to_numpy=True,
                                     show_progress_bar=False)
            if out.ndim > 1:  # two-label heads: probability of the "relevant" label
                out = out[:, -1]
            scores.extend(float(s) for s in out)
        counts = [len(ids) for ids in self.model.tokenizer([query] * len(texts), texts)["input_ids"]] if texts else []
        rerank_fit.report(truncated, self._max_length() or 0, self.spec.model_name)
        return RerankOutput(scores=scores, prompt_tokens=sum(counts), token_counts=counts, truncated=truncated)

    def _fit(self, query: str, documents: Sequence[str]) -> tuple[list[str], list[bool]]:
        """Each document, or its longest head (at a token boundary) with which the pair fits the model's
        length: the query is never cut (predict() alone would cut the longer side, query or document)."""
        limit = self._max_length()
        if not limit or not documents:
            return list(documents), [False] * len(documents)
        tokenizer = self.model.tokenizer
        pair_tokens = lambda doc: len(tokenizer(query, doc, verbose=False)["input_ids"])  # noqa: E731
        rerank_fit.check_room(pair_tokens(""), limit, fix="use a reranker trained on longer inputs")
        totals = [len(ids) for ids in tokenizer([query] * len(documents), list(documents), verbose=False)["input_ids"]]
        texts, truncated = list(documents), [total > limit for total in totals]
        for index, total in enumerate(totals):
            if total > limit:
                texts[index] = self._head(documents[index], pair_tokens, limit, total)
        return texts, truncated

    def _head(self, document: str, pair_tokens, limit: int, total: int) -> str:
        tokenizer = self.model.tokenizer
        if tokenizer.is_fast:  # cut the original text at a token's end: no normalisation, no decode
            ends = [end for _, end in tokenizer(document, add_special_tokens=False, verbose=False,
                                                 return_offsets_mapping=True)["offset_mapping"]]
            head = lambda k: document[:ends[k - 1]] if k else ""  # noqa: E731
            size = len(ends)
        else:
            ids = tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
            head = lambda k: tokenizer.decode(ids[:k])  # noqa: E731
            size = len(ids)
        keep = rerank_fit.longest_head(size, lambda k: pair_tokens(head(k)), limit, guess=size - (total - limit))
        return head(keep)


def load(spec: ModelSpec):
    if spec.model_type == ModelType.EMBEDDING:
        return SentenceTransformerEmbedding(spec)
    if spec.model_type == ModelType.RERANK:
        return CrossEncoderRerank(spec)
    raise EngineError("sentence_transformers serves embedding and rerank models only: use llama.cpp or "
                      "transformers for chat")
