"""Engine defaults that the memory planner must know too; import-light on purpose."""

LLAMA_CHAT_CTX = 4096  # tokens, shared by the chat slots (kv_unified)
LLAMA_CHAT_PARALLEL = 4
LLAMA_EMBED_CTX = 8192
# The yes/no rule scores one document at a time, so a score never depends on its neighbours.
LLAMA_RERANK_PARALLEL = 1
TORCH_MAX_LENGTH = 8192
