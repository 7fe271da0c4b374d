"""Qwen3-Embedding and Qwen3-Reranker folders with the official repos' file set (modules.json,
config_sentence_transformers.json, 1_Pooling/ or 1_LogitScore/, sharded safetensors, tokenizer
files; tiny weights), launched without --model-engine under the official name and under a
neutral hub-cache snapshot name: the server must pick the engine that applies their rules,
say which rule is in force, and return what the independent reference computes."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys

import httpx
import pytest

import qwen3_reference as ref
from conftest import ensure_model
from qwen3_models import ensure_layout_models

QUERY = "what is the capital of France?"
DOCS = ["Paris is the capital of France.", "pandas eat bamboo", "machine learning for language translation"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_layout_models(tmp_path_factory.getbasetemp())


def post(server, path: str, payload: dict, status: int = 200) -> dict:
    response = httpx.post(f"{server.url}{path}", json=payload, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def described(server, uid: str) -> dict:
    return httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).json()


@pytest.fixture(scope="module", params=["official", "neutral"])
def embedding(request, server, models):
    folder = models[f"embedding_{request.param}"]
    uid = ensure_model(server, f"layout-embed-{request.param}", model_name=f"layout-embed-{request.param}",
                       model_type="embedding", model_path=str(folder))
    return uid, folder


@pytest.fixture(scope="module", params=["official", "neutral"])
def reranker(request, server, models):
    folder = models[f"reranker_{request.param}"]
    uid = ensure_model(server, f"layout-rerank-{request.param}", model_name=f"layout-rerank-{request.param}",
                       model_type="rerank", model_path=str(folder))
    return uid, folder


def test_embedding_engine_and_rule(server, embedding):
    uid, _ = embedding
    model = described(server, uid)
    assert model["model_engine"] == "transformers"
    assert model["info"]["pooling"] == "last_token" and model["info"]["supports_dimensions"] is True
    assert model["info"]["rule"].startswith("qwen3-embedding: last-token pooling")


def test_documents_get_no_instruction(server, embedding):
    uid, folder = embedding
    body = post(server, "/v1/embeddings", {"model": uid, "input": DOCS})
    vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    ref.assert_close(vectors, [ref.embedding(folder, d) for d in DOCS])
    # An instruction sent with documents is neither applied (the model never saw one there) nor dropped.
    error = post(server, "/v1/embeddings", {"model": uid, "input": DOCS, "instruction": "Given a question"}, 400)
    assert "input_type" in error["error"]["message"]


def test_queries_get_the_instruction(server, embedding):
    uid, folder = embedding
    body = post(server, "/v1/embeddings", {"model": uid, "input": [QUERY], "input_type": "query"})
    ref.assert_close(body["data"][0]["embedding"], ref.embedding(folder, QUERY, query=True))


def test_dimensions_cut_and_renormalise(server, embedding):
    uid, folder = embedding
    body = post(server, "/v1/embeddings", {"model": uid, "input": DOCS[:2], "dimensions": 16,
                                           "encoding_format": "base64"})
    vectors = []
    for item in sorted(body["data"], key=lambda d: d["index"]):
        raw = base64.b64decode(item["embedding"])
        vectors.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    ref.assert_close(vectors, [ref.cut(ref.embedding(folder, d), 16) for d in DOCS[:2]])


def test_reranker_engine_rule_and_scores(server, reranker):
    uid, folder = reranker
    model = described(server, uid)
    assert model["model_engine"] == "transformers"
    assert model["info"]["rule"].startswith("qwen3-reranker: yes/no judging prompt")
    body = post(server, "/v1/rerank", {"model": uid, "query": QUERY, "documents": DOCS})
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    ref.assert_close([got[i] for i in range(len(DOCS))], [ref.rerank_score(folder, QUERY, d) for d in DOCS])


def test_sentence_transformers_engine_is_refused_for_qwen3_embedding(server, models):
    """That engine would put an instruction before documents and refuse `dimensions`."""
    response = httpx.post(f"{server.url}/v1/models", json={
        "model_name": "st-qwen3", "model_uid": "st-qwen3", "model_type": "embedding",
        "model_engine": "sentence_transformers", "model_path": str(models["embedding_official"])}, timeout=120)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "qwen3-embedding" in message and "--model-engine transformers" in message


def test_ragserve_list_shows_the_rule(server, embedding, reranker):
    env = {**os.environ, "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "ragserve.cli.main", "list", "--endpoint", server.url],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line for line in out.stdout.splitlines() if line.strip().startswith("│ layout-")}
    assert "qwen3-embedding: last-token pooling" in rows[embedding[0]]
    assert "qwen3-reranker: yes/no judging prompt" in rows[reranker[0]]


# llama.cpp with an f32 KV cache and no flash attention reproduces the reference to ~1e-6.
EXACT_LLAMA = {"flash_attn": "off", "cache_type_k": "f32", "cache_type_v": "f32"}


def test_qwen3_embedding_gguf_gets_the_rules_on_llama_cpp(server, models):
    """The GGUF conversion (pooling LAST, no EOS added by its tokenizer), launched without an engine."""
    uid = ensure_model(server, "layout-embed-gguf", model_name="layout-embed-gguf", model_type="embedding",
                       model_path=str(models["embedding_gguf"]), options=EXACT_LLAMA)
    model = described(server, uid)
    assert model["model_engine"] == "llama.cpp" and model["info"]["rule"].startswith("qwen3-embedding")
    folder = models["embedding"]
    body = post(server, "/v1/embeddings", {"model": uid, "input": DOCS})
    ref.assert_close([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])],
                     [ref.embedding(folder, d) for d in DOCS])
    body = post(server, "/v1/embeddings", {"model": uid, "input": [QUERY], "input_type": "query", "dimensions": 16})
    ref.assert_close(body["data"][0]["embedding"], ref.cut(ref.embedding(folder, QUERY, query=True), 16))
