"""sentence-transformers: bi-encoder embeddings and cross-encoder rerank from a local folder."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.base import EmbeddingEngine, EmbeddingOutput, EngineError, RerankEngine, RerankOutput


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

    def embed(self, texts: Sequence[str], *, is_query: bool = False,
              instruction: Optional[str] = None) -> EmbeddingOutput:
        kwargs: dict[str, Any] = {}
        if instruction:
            kwargs["prompt"] = instruction
        elif is_query and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        vectors = self.model.encode(list(texts), batch_size=self.max_batch_size, convert_to_numpy=True,
                                    show_progress_bar=False, **kwargs)
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
        return {"context_length": self._max_length(), "num_labels": self.model.num_labels}

    def _max_length(self) -> int | None:
        # `max_length` became `max_seq_length` in sentence-transformers 6; read whichever exists.
        return getattr(self.model, "max_seq_length", None) or getattr(self.model, "max_length", None)

    def rerank(self, query: str, documents: Sequence[str], *,
               instruction: Optional[str] = None) -> RerankOutput:
        pairs = [(query, doc) for doc in documents]
        # predict() applies the model's activation (sigmoid for one-label heads): scores in [0, 1].
        scores = self.model.predict(pairs, batch_size=self.max_batch_size, convert_to_numpy=True,
                                    show_progress_bar=False)
        if scores.ndim > 1:  # two-label heads: probability of the "relevant" label
            scores = scores[:, -1]
        encoded = self.model.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True,
                                       max_length=self._max_length())["input_ids"]
        counts = [len(ids) for ids in encoded]
        return RerankOutput(scores=[float(s) for s in scores], prompt_tokens=sum(counts), token_counts=counts)


def load(spec: ModelSpec):
    if spec.model_type == ModelType.EMBEDDING:
        return SentenceTransformerEmbedding(spec)
    if spec.model_type == ModelType.RERANK:
        return CrossEncoderRerank(spec)
    raise EngineError("sentence_transformers serves embedding and rerank models only: use llama.cpp or "
                      "transformers for chat")
