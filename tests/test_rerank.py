"""/v1/rerank on both engines, each score checked against an independent computation on the same model."""

from __future__ import annotations

import math

import httpx
import pytest

from conftest import smollm_gguf_path

QUERY = "What is the capital of France?"
# Largest |fast - exact| allowed on SmolLM2 Q4_1; the README states the measured figure.
FAST_TOLERANCE = 0.05
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "France is a country in Western Europe.",
    "Berlin is the capital of Germany.",
]


@pytest.fixture(scope="session")
def cross_encoder_model(server, cross_encoder_dir) -> str:
    return server.launch(model_name="minilm-cross", model_type="rerank", model_path=cross_encoder_dir)


@pytest.fixture(scope="session")
def yes_no_model(server) -> str:
    # A causal-LM GGUF (no classifier head): the engine must pick the Qwen3 yes/no rule by itself.
    # Exact batching: one document at a time, so each score is the reference's to 1e-4.
    return server.launch(model_name="smol-rerank", model_type="rerank", model_engine="llama.cpp",
                         model_path=smollm_gguf_path(), options={"rerank_batching": "exact"})


@pytest.fixture(scope="session")
def yes_no_fast_model(server) -> str:
    return server.launch(model_name="smol-rerank-fast", model_type="rerank", model_engine="llama.cpp",
                         model_path=smollm_gguf_path())


def rerank(server, **payload):
    response = httpx.post(f"{server.url}/v1/rerank", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def check_shape(body, n_docs: int, top_n: int | None = None):
    results = body["results"]
    expected = top_n or n_docs
    assert len(results) == expected
    indices = [r["index"] for r in results]
    assert len(set(indices)) == expected and all(0 <= i < n_docs for i in indices)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    return {r["index"]: r["relevance_score"] for r in results}


def test_cross_encoder_scores_match_direct_predict(server, cross_encoder_model, cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    body = rerank(server, model=cross_encoder_model, query=QUERY, documents=DOCUMENTS, return_documents=True)
    scores = check_shape(body, len(DOCUMENTS))
    reference = CrossEncoder(cross_encoder_dir, device="cpu").predict([(QUERY, d) for d in DOCUMENTS])
    for index, expected in enumerate(reference):
        assert math.isclose(scores[index], float(expected), abs_tol=1e-5)
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in body["results"])


def test_top_n_return_len_and_documents_off(server, cross_encoder_model):
    body = rerank(server, model=cross_encoder_model, query=QUERY, documents=DOCUMENTS, top_n=2,
                  return_documents=False, return_len=True)
    check_shape(body, len(DOCUMENTS), top_n=2)
    assert all(r["document"] is None for r in body["results"])
    assert body["meta"]["tokens"]["input_tokens"] > 4 * len(QUERY.split())


def test_cohere_and_jina_shapes(server, cross_encoder_model):
    objects = [{"text": d} for d in DOCUMENTS]
    body = rerank(server, model=cross_encoder_model, query=QUERY, documents=objects, top_n=3)
    check_shape(body, len(DOCUMENTS), top_n=3)
    tei = httpx.post(f"{server.url}/rerank", json={"model": cross_encoder_model, "query": QUERY,
                                                    "texts": DOCUMENTS}, timeout=60)
    assert tei.status_code == 200
    assert len(tei.json()["results"]) == len(DOCUMENTS)


def _judging_prompt(query: str, document: str) -> str:
    """Qwen3-Reranker's prompt as its model card writes it (tests/qwen3_reference.py), not as ragserve builds it."""
    import qwen3_reference as ref

    pair = f"<Instruct>: {ref.RERANK_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
    return ref.RERANK_PREFIX + pair + ref.RERANK_SUFFIX


def _reference_yes_no(prompt: str) -> float:
    """P(yes) / (P(yes) + P(no)) from the full next-token distribution, read without any logit bias."""
    import xllamacpp as xlc

    from gguf import GGUFReader  # the gguf package's reader, not ours

    field = GGUFReader(smollm_gguf_path()).fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    yes, no = vocab.index("yes"), vocab.index("no")
    params = xlc.CommonParams()
    params.model.path = smollm_gguf_path()
    params.n_ctx = 1024
    params.verbosity = -1
    server = xlc.Server(params)
    result = server.handle_completions({"prompt": prompt, "n_predict": 1, "n_probs": len(vocab),
                                        "temperature": 0})
    logprobs = {t["id"]: t["logprob"] for t in result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    p_yes, p_no = math.exp(logprobs[yes]), math.exp(logprobs[no])
    return p_yes / (p_yes + p_no)


def test_yes_no_rule_on_causal_gguf_matches_reference(server, yes_no_model):
    described = httpx.get(f"{server.url}/v1/models/{yes_no_model}").json()
    assert described["info"]["rerank_mode"] == "yes_no"
    docs = DOCUMENTS[:3]
    body = rerank(server, model=yes_no_model, query=QUERY, documents=docs, return_len=True)
    scores = check_shape(body, len(docs))
    for index, doc in enumerate(docs):
        expected = _reference_yes_no(_judging_prompt(QUERY, doc))
        assert math.isclose(scores[index], expected, abs_tol=1e-4), (index, scores[index], expected)
    assert body["meta"]["tokens"]["input_tokens"] > 50


def test_custom_instruction_changes_the_prompt(server, yes_no_model):
    plain = rerank(server, model=yes_no_model, query=QUERY, documents=DOCUMENTS[:1])
    instructed = rerank(server, model=yes_no_model, query=QUERY, documents=DOCUMENTS[:1],
                        instruction="Judge whether the document is written in German")
    assert plain["results"][0]["relevance_score"] != instructed["results"][0]["relevance_score"]


def test_fast_batching_is_the_default_and_stays_near_the_reference(server, yes_no_fast_model):
    """Parallel slots with a shared cached prefix change the summation order; on this Q4_1 model that
    moves scores by about 1e-2 (README: "Rerank batching"), never more than FAST_TOLERANCE."""
    described = httpx.get(f"{server.url}/v1/models/{yes_no_fast_model}").json()
    assert described["info"]["rerank_batching"] == "fast" and described["info"]["parallel"] > 1
    body = rerank(server, model=yes_no_fast_model, query=QUERY, documents=DOCUMENTS)
    scores = check_shape(body, len(DOCUMENTS))
    for index, doc in enumerate(DOCUMENTS):
        expected = _reference_yes_no(_judging_prompt(QUERY, doc))
        assert abs(scores[index] - expected) <= FAST_TOLERANCE, (index, scores[index], expected)


def test_the_rule_in_force_is_shown_for_a_model_scored_by_the_yes_no_rule(server, yes_no_model):
    """SmolLM2 is no Qwen3 model, but it is scored by Qwen3-Reranker's rule: describe and list say so."""
    info = httpx.get(f"{server.url}/v1/models/{yes_no_model}").json()["info"]
    assert info["rerank_mode"] == "yes_no"
    assert info["rule"].startswith("qwen3-reranker: yes/no judging prompt")
