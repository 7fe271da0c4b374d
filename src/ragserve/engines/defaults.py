"""Engine defaults that the memory planner must know too; import-light on purpose."""

LLAMA_CHAT_CTX = 4096  # tokens, shared by the chat slots (kv_unified)
LLAMA_CHAT_PARALLEL = 4
LLAMA_EMBED_CTX = 8192
# Slots of a llama.cpp yes/no reranker in its default (fast) batching: documents run as parallel
# sequences sharing the judging prompt's cached prefix. rerank_batching=exact uses one slot.
LLAMA_RERANK_PARALLEL = 4
RERANK_BATCHING = ("fast", "exact")


def llama_rerank_slots(n_parallel: int | None, options: dict) -> int:
    """Slots (each holding n_ctx of KV cache) a llama.cpp yes/no reranker allocates for this launch."""
    if str(options.get("rerank_batching") or "fast").strip().lower() == "exact":
        return 1
    return int(n_parallel or options.get("n_parallel") or LLAMA_RERANK_PARALLEL)


TORCH_MAX_LENGTH = 8192
