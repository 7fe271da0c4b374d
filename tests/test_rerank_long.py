"""Long rerank documents are cut to the model's context, not refused, on every rerank engine.

Each test sends RAGFlow's kind of request through the real server: a short document and one of about
5,000 tokens, with a context far smaller. The answer must be a 200 with finite scores and the cut
counted in `meta`; the long document's score must equal an independent reference computed on the
explicitly cut text: the longest run of its leading words with which the whole prompt fits, counted
with the reference's own tokenizer (the words are single tokens, so the engine's token cut and the
reference's word cut name the same text).
"""

from __future__ import annotations

import math

import httpx
import pytest

import qwen3_reference as ref
from conftest import smollm_gguf_path
from qwen3_models import ensure_models

QUERY = "what is the capital of France?"
SHORT = "Paris is the capital of France."
CANDIDATES = ("Paris France capital city river Seine Berlin Germany Tokyo Japan query document passage "
              "search answer question model server vector score weather today river city").split()
LONG_WORDS = 5000
N_CTX = 512
EXACT_LLAMA = {"flash_attn": "off", "cache_type_k": "f32", "cache_type_v": "f32"}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_models(tmp_path_factory.getbasetemp())


def long_words(one_token) -> list[str]:
    """5,000 words, each a single token after a space in the model's vocabulary."""
    words = [w for w in CANDIDATES if one_token(w)]
    assert len(words) >= 5, words
    return [words[i % len(words)] for i in range(LONG_WORDS)]


def words_that_fit(words: list[str], prompt_tokens, limit: int) -> int:
    """The largest m such that the prompt holding the first m words has at most `limit` tokens."""
    low, high = 0, len(words)
    assert prompt_tokens(" ".join(words)) > limit, "the long document must not fit, or nothing is cut"
    while low < high:
        middle = (low + high + 1) // 2
        if prompt_tokens(" ".join(words[:middle])) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def rerank(server, model: str, documents: list[str], query: str = QUERY) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/rerank", timeout=300,
                      json={"model": model, "query": query, "documents": documents, "return_len": True})


def scores_of(response: httpx.Response, count: int) -> list[float]:
    assert response.status_code == 200, response.text
    body = response.json()
    scores = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert sorted(scores) == list(range(count))
    assert all(math.isfinite(s) for s in scores.values())
    assert body["meta"]["truncated_documents"] == 1, body["meta"]
    return [scores[i] for i in range(count)]


def worker_log(server, uid: str) -> str:
    [log] = server.home.rglob(f"worker-{uid}.log")
    return log.read_text(errors="replace")


def launch(server, uid: str, **payload) -> str:
    if httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).status_code != 200:
        server.launch(model_uid=uid, model_name=uid, model_type="rerank", **payload)
    return uid


# ---- Qwen3 judging prompt (tiny Qwen3 weights): transformers, llama.cpp yes/no and rank pooling ----

def qwen3_prompt_tokens(models):
    tokenizer = ref._tokenizer(str(models["reranker"]))
    frame = (len(tokenizer.encode(ref.RERANK_PREFIX, add_special_tokens=False))
             + len(tokenizer.encode(ref.RERANK_SUFFIX, add_special_tokens=False)))

    def count(document: str) -> int:
        pair = f"<Instruct>: {ref.RERANK_INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {document}"
        return frame + len(tokenizer.encode(pair, add_special_tokens=False))

    one_token = lambda w: len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1  # noqa: E731
    return count, one_token


# The prompt length each engine cuts to: the context; llama.cpp keeps one position of it free.
QWEN3_ENGINES = {
    "transformers": ({"model_engine": "transformers"}, "reranker", N_CTX),
    "llama-yes_no": ({"model_engine": "llama.cpp", "options": EXACT_LLAMA}, "reranker_gguf_plain", N_CTX - 1),
    "llama-rank": ({"model_engine": "llama.cpp", "options": EXACT_LLAMA}, "reranker_gguf_rank", N_CTX - 1),
}


@pytest.mark.parametrize("engine", sorted(QWEN3_ENGINES))
def test_qwen3_long_document_is_cut_to_the_context(server, models, engine):
    payload, model_key, limit = QWEN3_ENGINES[engine]
    uid = launch(server, f"long-qwen3-{engine}", model_path=str(models[model_key]), n_ctx=N_CTX, **payload)
    count, one_token = qwen3_prompt_tokens(models)
    words = long_words(one_token)
    scores = scores_of(rerank(server, uid, [SHORT, " ".join(words)]), 2)
    kept = words_that_fit(words, count, limit)
    cut = " ".join(words[:kept])
    assert f"1 of 2 documents were too long for the context and were cut: each of their pairs now holds " \
           f"{limit} tokens at most" in worker_log(server, uid)
    ref.assert_close(scores, [ref.rerank_score(models["reranker"], QUERY, SHORT),
                              ref.rerank_score(models["reranker"], QUERY, cut)])


def test_query_longer_than_the_context_is_a_400_naming_the_fix(server, models):
    uid = launch(server, "long-qwen3-llama-yes_no", model_path=str(models["reranker_gguf_plain"]), n_ctx=N_CTX,
                 model_engine="llama.cpp", options=EXACT_LLAMA)
    response = rerank(server, uid, [SHORT], query=" ".join(["Paris"] * 2 * N_CTX))
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "shorten the query" in message and "--n-ctx" in message, message


# ---- SmolLM2 GGUF (quantized) by the yes/no rule, exact batching -----------------------------

@pytest.fixture(scope="module")
def smollm_reference():
    """A llama.cpp server of our own: its tokenizer counts, its full next-token distribution scores."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = smollm_gguf_path()
    params.n_ctx = 2 * N_CTX
    params.verbosity = -1
    return xlc.Server(params)


def smollm_yes_no(server, prompt: str) -> float:
    from ragserve.engines.gguf_meta import read_gguf_header

    vocab = read_gguf_header(smollm_gguf_path(), keep_arrays=("tokenizer.ggml.tokens",))[0]["tokenizer.ggml.tokens"]
    result = server.handle_completions({"prompt": prompt, "n_predict": 1, "n_probs": len(vocab), "temperature": 0})
    logprobs = {t["id"]: t["logprob"] for t in result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    p_yes, p_no = math.exp(logprobs[vocab.index("yes")]), math.exp(logprobs[vocab.index("no")])
    return p_yes / (p_yes + p_no)


def test_smollm_yes_no_long_document_is_cut(server, smollm_reference):
    client = httpx.Client(base_url=smollm_reference.listening_address, trust_env=False, timeout=60)
    tokens = lambda text: client.post("/tokenize", json={  # noqa: E731
        "content": text, "add_special": True, "parse_special": True}).json()["tokens"]
    prompt = lambda doc: (ref.RERANK_PREFIX + f"<Instruct>: {ref.RERANK_INSTRUCTION}\n<Query>: {QUERY}\n"  # noqa: E731
                          f"<Document>: {doc}" + ref.RERANK_SUFFIX)
    words = long_words(lambda w: len(tokens(" " + w)) == 1)
    uid = launch(server, "long-smollm-exact", model_engine="llama.cpp", model_path=smollm_gguf_path(),
                 n_ctx=N_CTX, options={"rerank_batching": "exact"})
    scores = scores_of(rerank(server, uid, [SHORT, " ".join(words)]), 2)
    kept = words_that_fit(words, lambda doc: len(tokens(prompt(doc))), N_CTX - 1)
    expected = [smollm_yes_no(smollm_reference, prompt(SHORT)),
                smollm_yes_no(smollm_reference, prompt(" ".join(words[:kept])))]
    ref.assert_close(scores, expected)


# ---- sentence-transformers cross-encoder ------------------------------------------------------

def test_cross_encoder_long_document_is_cut(server, cross_encoder_dir):
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_dir)
    words = long_words(lambda w: len(tokenizer.tokenize(w.lower())) == 1)
    uid = launch(server, "long-cross-encoder", model_engine="sentence_transformers", model_path=cross_encoder_dir)
    limit = httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).json()["info"]["context_length"]
    assert limit == 512
    scores = scores_of(rerank(server, uid, [SHORT, " ".join(words)]), 2)
    kept = words_that_fit(words, lambda doc: len(tokenizer(QUERY, doc)["input_ids"]), limit)
    expected = CrossEncoder(cross_encoder_dir, device="cpu").predict([(QUERY, SHORT), (QUERY, " ".join(words[:kept]))])
    ref.assert_close(scores, [float(s) for s in expected])
