"""Qwen3 through the real server, launched like a user would: every vector and score the server
returns is checked against the reference computation on the same weights (to 1e-4)."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qwen3_reference as ref  # noqa: E402
from qwen3_models import ensure_models  # noqa: E402

DOCS = [
    "Paris is the capital of France.",
    "pandas eat bamboo",
    "The quick brown fox jumps over the lazy dog near the river Seine in Paris, France, today.",
    "machine learning with neural network models for language translation and search",
]
QUERY = "what is the capital of France?"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_models(tmp_path_factory.getbasetemp())


def post(server, path: str, payload: dict, status: int = 200) -> dict:
    response = httpx.post(f"{server.url}{path}", json=payload, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def launch(server, uid: str, path, model_type: str, **extra) -> str:
    """Xinference's launch shape; no engine given, so the server must choose it from the folder."""
    models = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    if uid not in models:
        server.launch(model_name=uid, model_uid=uid, model_type=model_type, model_path=str(path), **extra)
    return uid


@pytest.fixture(scope="module")
def embedding_uid(server, models):
    return launch(server, "qwen3-embedding-tiny", models["embedding"], "embedding")


@pytest.fixture(scope="module")
def reranker_uid(server, models):
    return launch(server, "qwen3-reranker-tiny", models["reranker"], "rerank")


@pytest.fixture(scope="module")
def chat_uid(server, models):
    return launch(server, "qwen3-chat-tiny", models["chat"], "LLM")


def test_auto_detection_picks_engine_and_rule(server, embedding_uid, reranker_uid, chat_uid):
    described = {uid: httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).json()
                 for uid in (embedding_uid, reranker_uid, chat_uid)}
    text = {uid: str(d) for uid, d in described.items()}
    assert "transformers" in text[embedding_uid] and "last_token" in text[embedding_uid]
    assert "transformers" in text[reranker_uid] and "yes_no" in text[reranker_uid]
    assert "transformers" in text[chat_uid]


def test_wrong_model_type_is_a_clear_error(server, models):
    response = httpx.post(f"{server.url}/v1/models", json={
        "model_name": "wrong", "model_uid": "wrong-type", "model_type": "rerank",
        "model_path": str(models["embedding"])}, timeout=120)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "--model-type embedding" in message and "embedding" in message


def test_document_embeddings_match_reference(server, models, embedding_uid):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    result = client.embeddings.create(model=embedding_uid, input=DOCS)
    vectors = [d.embedding for d in sorted(result.data, key=lambda d: d.index)]
    ref.assert_close(vectors, [ref.embedding(models["embedding"], d) for d in DOCS])
    assert result.usage.prompt_tokens > 0


@pytest.mark.parametrize("selector", [{"input_type": "query"}, {"is_query": True}])
def test_query_embeddings_carry_the_instruction(server, models, embedding_uid, selector):
    body = post(server, "/v1/embeddings", {"model": embedding_uid, "input": [QUERY, "pandas"], **selector})
    vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    ref.assert_close(vectors, [ref.embedding(models["embedding"], t, query=True) for t in (QUERY, "pandas")])


def test_query_instruction_from_request(server, models, embedding_uid):
    task = "Given a question, find the city"
    body = post(server, "/v1/embeddings", {"model": embedding_uid, "input": QUERY, "input_type": "query",
                                           "instruction": task})
    ref.assert_close(body["data"][0]["embedding"], ref.embedding(models["embedding"], QUERY, query=True, task=task))


def test_dimensions_cut_and_renormalise(server, models, embedding_uid):
    body = post(server, "/v1/embeddings", {"model": embedding_uid, "input": DOCS[:2], "dimensions": 24,
                                           "encoding_format": "base64"})
    vectors = []
    for item in sorted(body["data"], key=lambda d: d["index"]):
        raw = base64.b64decode(item["embedding"])
        vectors.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    ref.assert_close(vectors, [ref.cut(ref.embedding(models["embedding"], d), 24) for d in DOCS[:2]])


def test_rerank_matches_reference(server, models, reranker_uid):
    body = post(server, "/v1/rerank", {"model": reranker_uid, "query": QUERY, "documents": DOCS,
                                       "return_documents": True})
    expected = [ref.rerank_score(models["reranker"], QUERY, d) for d in DOCS]
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    ref.assert_close([got[i] for i in range(len(DOCS))], expected)
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    top = post(server, "/v1/rerank", {"model": reranker_uid, "query": QUERY, "documents": DOCS, "top_n": 2})
    assert [r["index"] for r in top["results"]] == sorted(range(len(DOCS)), key=lambda i: -expected[i])[:2]


def test_rerank_instruction_from_request(server, models, reranker_uid):
    instruction = "Judge whether the document is about animals"
    body = post(server, "/v1/rerank", {"model": reranker_uid, "query": QUERY, "documents": DOCS[:2],
                                       "instruction": instruction})
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    ref.assert_close([got[0], got[1]],
                     [ref.rerank_score(models["reranker"], QUERY, d, instruction=instruction) for d in DOCS[:2]])


# llama.cpp's defaults (f16 KV cache, flash attention) move these scores by ~5e-4 on the tiny
# model; f32 and no flash attention reproduce the transformers reference to ~1e-6.
EXACT_LLAMA = {"flash_attn": "off", "cache_type_k": "f32", "cache_type_v": "f32"}


@pytest.mark.parametrize("mode", ["plain", "rank", "rank-override-yes_no"])
def test_gguf_reranker_matches_reference(server, models, mode):
    pytest.importorskip("xllamacpp")
    path = models["reranker_gguf_plain" if mode == "plain" else "reranker_gguf_rank"]
    options = {**EXACT_LLAMA, **({"rerank_mode": "yes_no"} if mode.endswith("yes_no") else {})}
    extra = {"options": options}
    uid = launch(server, f"qwen3-reranker-gguf-{mode}", path, "rerank", **extra)
    described = str(httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).json())
    assert ("'rank'" in described) == (mode == "rank"), described
    body = post(server, "/v1/rerank", {"model": uid, "query": QUERY, "documents": DOCS})
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    ref.assert_close([got[i] for i in range(len(DOCS))],
                     [ref.rerank_score(models["reranker"], QUERY, d) for d in DOCS])


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_reasoning_split(server, models, chat_uid, thinking):
    from openai import OpenAI

    expected = ref.greedy_chat(models["chat"], FRANCE, enable_thinking=thinking)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    result = client.chat.completions.create(
        model=chat_uid, messages=FRANCE, temperature=0, max_tokens=32,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    message = result.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    if thinking:
        assert expected["text"] == "<think>hmm</think>Paris"
        assert (reasoning, message.content) == ("hmm", "Paris")
    else:
        assert expected["text"] == "Paris"
        assert not reasoning and message.content == "Paris"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == expected["prompt_tokens"]
    assert result.usage.completion_tokens == expected["completion_tokens"]


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_reasoning_split_streaming(server, chat_uid, thinking):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    stream = client.chat.completions.create(
        model=chat_uid, messages=FRANCE, temperature=0, max_tokens=32, stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    reasoning, content, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content) == (("hmm", "Paris") if thinking else ("", "Paris"))
    assert finish == "stop"


def test_reasoning_stream_read_as_langchain_xinference(server, chat_uid):
    """langchain-xinference reads delta["content"] on every chunk, reasoning chunks included (None there
    is read as ""); xinference-client fetches the stream."""
    from xinference_client import RESTfulClient

    model = RESTfulClient(server.url).get_model(chat_uid)
    chunks = list(model.chat(messages=FRANCE, generate_config={
        "stream": True, "max_tokens": 32, "temperature": 0, "chat_template_kwargs": {"enable_thinking": True}}))
    content = reasoning = ""
    for chunk in chunks:
        if not chunk["choices"]:
            continue
        delta = chunk["choices"][0]["delta"]
        content += delta["content"] or ""
        reasoning += delta.get("reasoning_content") or ""
    assert (reasoning, content) == ("hmm", "Paris")
