"""Xinference's answer shapes where its clients read them, through the real gateway.

xinference-client fetches the answers; each is then read exactly as langchain-xinference (chat stream)
and RAGFlow (rerank token count) read them.
"""

from __future__ import annotations

import pytest

from conftest import ensure_model, smollm_gguf_path


@pytest.fixture(scope="module")
def xinference(server):
    from xinference_client import RESTfulClient

    return RESTfulClient(server.url)


def langchain_xinference_content(choice: dict) -> str:
    """ChatXinference._chat_response_to_chat_generation_chunk: `message["content"]` on every chunk."""
    message = choice["message"] if "message" in choice else choice["delta"]
    if message["content"] is None:
        message["content"] = ""
    return message["content"]


def test_every_chat_stream_chunk_has_content_as_langchain_xinference_reads_it(xinference, chat_uid):
    model = xinference.get_model(chat_uid)
    chunks = list(model.chat(messages=[{"role": "user", "content": "Say hello."}],
                             generate_config={"stream": True, "max_tokens": 8, "temperature": 0}))
    text = "".join(langchain_xinference_content(chunk["choices"][0]) for chunk in chunks if chunk["choices"])
    finishing = chunks[-1]["choices"][0]
    assert finishing["finish_reason"] in ("stop", "length") and finishing["delta"]["content"] == ""
    whole = model.chat(messages=[{"role": "user", "content": "Say hello."}],
                       generate_config={"max_tokens": 8, "temperature": 0})
    assert text == langchain_xinference_content(whole["choices"][0])


@pytest.fixture(scope="module")
def yes_no_reranker(server) -> str:
    return ensure_model(server, "t-rerank-yes-no", model_name="t-rerank-yes-no", model_type="rerank",
                        model_engine="llama.cpp", model_path=smollm_gguf_path())


def ragflow_token_count(resp: dict) -> int:
    """RAGFlow's total_token_count_from_response, for a rerank answer: input + output tokens."""
    return resp["meta"]["tokens"]["input_tokens"] + resp["meta"]["tokens"]["output_tokens"]


def test_rerank_reports_no_output_tokens(xinference, server, yes_no_reranker):
    documents = ["Paris is the capital of France.", "Bees live in hives."]
    answer = xinference.get_model(yes_no_reranker).rerank(documents, "What is the capital of France?",
                                                          return_len=True)
    tokens = answer["meta"]["tokens"]
    # A reranker generates nothing; its input is counted once, as the usage field counts it.
    assert tokens["output_tokens"] == 0
    assert tokens["input_tokens"] > 2 * len(" ".join(documents).split())
    assert ragflow_token_count(answer) == answer["usage"]["total_tokens"] == tokens["input_tokens"]


def test_rerank_meta_counts_documents_cut_to_the_context(server):
    """RAGFlow sends long chunks untruncated: they are cut to fit (not refused), and meta says how many."""
    uid = ensure_model(server, "t-rerank-ctx256", model_name="t-rerank-ctx256", model_type="rerank",
                       model_engine="llama.cpp", model_path=smollm_gguf_path(), n_ctx=256)
    documents = ["Paris is the capital of France.", "Paris. " + " ".join(f"word{i}" for i in range(400)),
                 "Bees live in hives."]
    from xinference_client import RESTfulClient

    answer = RESTfulClient(server.url).get_model(uid).rerank(documents, "What is the capital of France?",
                                                             return_len=True)
    assert len(answer["results"]) == 3
    assert answer["meta"]["truncated_documents"] == 1
    short = RESTfulClient(server.url).get_model(uid).rerank(documents[::2], "What is the capital of France?")
    assert "truncated_documents" not in short["meta"]
