"""Qwen3 embedding and reranker recipes, as their model cards define them.

Shared by every engine that serves these models (transformers, llama.cpp), so the
prompt text is written once.
"""

from __future__ import annotations

DEFAULT_EMBEDDING_TASK = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def embedding_query_text(query: str, task: str | None = None) -> str:
    """Queries carry the task instruction; documents are embedded as they are."""
    return f"Instruct: {task or DEFAULT_EMBEDDING_TASK}\nQuery:{query}"


def rerank_pair_text(query: str, document: str, instruction: str | None = None) -> str:
    return f"<Instruct>: {instruction or DEFAULT_RERANK_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


def rerank_prompt(query: str, document: str, instruction: str | None = None) -> str:
    """The full judging prompt; the score is P(yes) / (P(yes) + P(no)) at its last position."""
    return RERANK_PREFIX + rerank_pair_text(query, document, instruction) + RERANK_SUFFIX
