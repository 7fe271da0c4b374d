"""The core API end to end: real server, real workers, real engines, the real OpenAI SDK and httpx."""

from __future__ import annotations

import base64
import json
import math

import httpx
import numpy as np
import openai
import pytest

from conftest import minilm_path, smollm_gguf_path

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="session")
def chat_model(server) -> str:
    return server.launch(model_name="smol-chat", model_type="LLM", model_path=smollm_gguf_path())


@pytest.fixture(scope="session")
def embed_model(server) -> str:
    # No engine given: a sentence-transformers folder must get the sentence_transformers engine.
    return server.launch(model_name="minilm", model_type="embedding", model_path=minilm_path())


@pytest.fixture(scope="session")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- chat ------------------------------------------------------------------------------------

def test_chat_answers_paris_with_usage(oai, chat_model):
    reply = oai.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": QUESTION}],
                                        temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_assembles_to_the_same_text(oai, chat_model):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = oai.chat.completions.create(model=chat_model, messages=messages, temperature=0, max_tokens=24)
    pieces, finish, usage = [], None, None
    stream = oai.chat.completions.create(model=chat_model, messages=messages, temperature=0, max_tokens=24,
                                         stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 3, "tokens must arrive as separate chunks"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def _completion_tokens_counted(server, model: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("ragserve_tokens_total{") and f'model="{model}"' in line and 'kind="completion"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_stream_without_usage_is_counted_but_sends_none(server, chat_model):
    """The gateway counts every stream's tokens; a client that did not ask for usage must not see any."""
    before = _completion_tokens_counted(server, chat_model)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      json={"model": chat_model, "messages": [{"role": "user", "content": "Count to ten."}],
                            "max_tokens": 12, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        raw = b"".join(response.iter_raw()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events), "no comments or other lines reach the client"
    assert "usage" not in raw
    pieces = [choice["delta"].get("content") for e in events[:-1]
              for choice in json.loads(e[6:])["choices"]]
    assert len([p for p in pieces if p]) > 3
    assert _completion_tokens_counted(server, chat_model) - before == 12


def test_stream_with_usage_is_counted_once(oai, server, chat_model):
    """A client that asks for usage gets OpenAI's usage chunk; the gateway counts the same tokens."""
    before = _completion_tokens_counted(server, chat_model)
    usage = None
    for chunk in oai.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": "Hi."}],
                                             temperature=0, max_tokens=7, stream=True,
                                             stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    assert usage.completion_tokens == 7
    assert _completion_tokens_counted(server, chat_model) - before == 7


def test_max_tokens_and_stop(oai, chat_model):
    messages = [{"role": "user", "content": QUESTION}]
    short = oai.chat.completions.create(model=chat_model, messages=messages, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2
    full = oai.chat.completions.create(model=chat_model, messages=messages, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    assert "Paris" in text
    stopped = oai.chat.completions.create(model=chat_model, messages=messages, temperature=0, max_tokens=16,
                                          stop=["Paris"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index("Paris")]


def test_seed_makes_sampling_repeatable(oai, chat_model):
    def sample(seed: int) -> str:
        return oai.chat.completions.create(
            model=chat_model, messages=[{"role": "user", "content": "Write a word."}], temperature=1.5,
            max_tokens=12, seed=seed).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1, "different seeds should sample differently"


def test_text_completion(oai, chat_model):
    reply = oai.completions.create(model=chat_model, prompt="The capital of France is", temperature=0,
                                   max_tokens=3)
    assert "Paris" in reply.choices[0].text
    assert reply.usage.completion_tokens <= 3


# ---- embeddings ------------------------------------------------------------------------------

def test_embeddings_rank_related_sentences_higher(oai, embed_model):
    texts = ["A man is playing a guitar.", "Someone plays a musical instrument.", "The stock market fell today."]
    result = oai.embeddings.create(model=embed_model, input=texts, encoding_format="float")
    vectors = [d.embedding for d in sorted(result.data, key=lambda d: d.index)]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    related, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert related > 0.4 > unrelated
    assert result.usage.prompt_tokens > 10


def test_embeddings_match_sentence_transformers_directly(server, embed_model):
    from sentence_transformers import SentenceTransformer

    text = "Vector search finds similar passages."
    body = httpx.post(f"{server.url}/v1/embeddings", json={"model": embed_model, "input": text}, timeout=60).json()
    reference = SentenceTransformer(minilm_path(), device="cpu").encode([text])[0]
    assert np.allclose(body["data"][0]["embedding"], reference, atol=1e-5)


def test_embeddings_base64_equals_float(server, embed_model):
    payload = {"model": embed_model, "input": ["hello world", "goodbye"]}
    floats = httpx.post(f"{server.url}/v1/embeddings", json=payload, timeout=60).json()
    encoded = httpx.post(f"{server.url}/v1/embeddings", json={**payload, "encoding_format": "base64"},
                         timeout=60).json()
    for f, e in zip(floats["data"], encoded["data"]):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        assert np.allclose(decoded, f["embedding"], atol=1e-6)


def test_openai_sdk_default_base64_embeddings(oai, embed_model):
    # The SDK asks for base64 by default and decodes it itself.
    result = oai.embeddings.create(model=embed_model, input="a single string")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 384
    assert math.isclose(float(np.linalg.norm(result.data[0].embedding)), 1.0, rel_tol=1e-3)


def test_dimensions_rejected_for_non_matryoshka_model(server, embed_model):
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": embed_model, "input": "x y", "dimensions": 64})
    assert r.status_code == 400
    assert "dimensions" in r.json()["error"]["message"]


# ---- model management ------------------------------------------------------------------------

def test_models_list_and_describe(server, chat_model, embed_model):
    listing = httpx.get(f"{server.url}/v1/models").json()
    ids = {m["id"]: m for m in listing["data"]}
    assert ids[chat_model]["model_type"] == "LLM" and ids[chat_model]["model_engine"] == "llama.cpp"
    assert ids[embed_model]["model_engine"] == "sentence_transformers"
    described = httpx.get(f"{server.url}/v1/models/{embed_model}").json()
    assert described["state"] == "ready" and described["dimensions"] == 384


def test_terminate_frees_the_worker(server):
    import psutil

    uid = server.launch(model_name="to-terminate", model_type="LLM", model_path=smollm_gguf_path())
    pid = httpx.get(f"{server.url}/v1/models/{uid}").json()["info"] and _worker_pid(server, uid)
    assert psutil.pid_exists(pid)
    assert httpx.delete(f"{server.url}/v1/models/{uid}").status_code == 200
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert httpx.get(f"{server.url}/v1/models/{uid}").status_code == 404


def _worker_pid(server, uid: str) -> int:
    address = httpx.get(f"{server.url}/v1/models/{uid}").json()["address"]
    return httpx.get(f"{address}/health").json()["pid"]


def test_abandoned_streams_stop_generating(server, chat_model):
    # More abandoned long streams than the model has slots: if generation ran on for nobody, or a slot
    # stayed taken, the request after them would wait for minutes instead of answering.
    for _ in range(5):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": chat_model, "max_tokens": 3000, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a very long story."}]}) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=45, json={
        "model": chat_model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": QUESTION}]})
    assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
