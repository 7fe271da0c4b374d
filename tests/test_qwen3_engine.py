"""The transformers engine on tiny random-weight Qwen3 models, against the reference computation."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qwen3_reference as ref  # noqa: E402
from qwen3_models import ensure_models  # noqa: E402

from ragserve.control.spec import ModelSpec, ModelType  # noqa: E402
from ragserve.engines.base import EngineError, EngineInputError, GenerationRequest  # noqa: E402
from ragserve.engines.transformers import load  # noqa: E402

DOCS = [
    "Paris is the capital of France.",
    "pandas eat bamboo",
    "The quick brown fox jumps over the lazy dog near the river Seine in Paris, France, today.",
    "yes",
    "machine learning with neural network models for language translation and search",
]
QUERY = "what is the capital of France?"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_models(tmp_path_factory.getbasetemp())


def spec(path, model_type: ModelType, **options) -> ModelSpec:
    return ModelSpec(uid="t", model_name="tiny", model_type=model_type, model_engine="transformers",
                     model_path=str(path), options=options)


@pytest.fixture(scope="module")
def embedder(models):
    return load(spec(models["embedding"], ModelType.EMBEDDING, max_batch_size=2))


@pytest.fixture(scope="module")
def reranker(models):
    return load(spec(models["reranker"], ModelType.RERANK, max_batch_size=2))


@pytest.fixture(scope="module")
def chat(models):
    return load(spec(models["chat"], ModelType.LLM))


@pytest.mark.parametrize("folder", ["embedding", "embedding_eos"])
def test_documents_embed_like_reference(models, folder):
    # Two tokenizer styles: one leaves <|endoftext|> to the caller, one appends it itself.
    engine = load(spec(models[folder], ModelType.EMBEDDING, max_batch_size=2))
    out = engine.embed(DOCS, is_query=False)
    assert len(out.vectors) == len(DOCS)
    for text, vector in zip(DOCS, out.vectors):
        ref.assert_close(vector, ref.embedding(models[folder], text))
    assert engine.supports_dimensions and engine.dimensions == 64


def test_queries_carry_the_instruction(models, embedder):
    out = embedder.embed([QUERY, "pandas"], is_query=True)
    for text, vector in zip([QUERY, "pandas"], out.vectors):
        ref.assert_close(vector, ref.embedding(models["embedding"], text, query=True))
    custom = "Given a question, find the city"
    out = embedder.embed([QUERY], is_query=True, instruction=custom)
    ref.assert_close(out.vectors[0], ref.embedding(models["embedding"], QUERY, query=True, task=custom))
    # The same text as a document has no prefix, so a different vector.
    as_doc = embedder.embed([QUERY]).vectors[0]
    assert max(abs(a - b) for a, b in zip(as_doc, out.vectors[0])) > 1e-2


def test_embedding_task_option_is_the_default_instruction(models):
    task = "Find the passage"
    engine = load(spec(models["embedding"], ModelType.EMBEDDING, embedding_task=task))
    ref.assert_close(engine.embed([QUERY], is_query=True).vectors[0],
                     ref.embedding(models["embedding"], QUERY, query=True, task=task))


def test_batching_does_not_change_vectors(models):
    one_by_one = load(spec(models["embedding"], ModelType.EMBEDDING, max_batch_size=1)).embed(DOCS).vectors
    together = load(spec(models["embedding"], ModelType.EMBEDDING, max_batch_size=64)).embed(DOCS).vectors
    ref.assert_close(together, one_by_one, tol=1e-5)


def test_rerank_scores_match_reference(models, reranker):
    out = reranker.rerank(QUERY, DOCS)
    expected = [ref.rerank_score(models["reranker"], QUERY, doc) for doc in DOCS]
    ref.assert_close(out.scores, expected)
    # Random weights still spread the scores: a wrong rule or token would show.
    assert max(expected) - min(expected) > 0.05
    assert out.prompt_tokens > 0


def test_rerank_instruction_is_used(models, reranker):
    instruction = "Judge whether the document is about animals"
    out = reranker.rerank(QUERY, DOCS[:3], instruction=instruction)
    expected = [ref.rerank_score(models["reranker"], QUERY, d, instruction=instruction) for d in DOCS[:3]]
    ref.assert_close(out.scores, expected)
    assert reranker.rerank(QUERY, []).scores == []


def test_rerank_instruction_option(models):
    instruction = "Find the city"
    engine = load(spec(models["reranker"], ModelType.RERANK, rerank_instruction=instruction))
    ref.assert_close(engine.rerank(QUERY, DOCS[:2]).scores,
                     [ref.rerank_score(models["reranker"], QUERY, d, instruction=instruction) for d in DOCS[:2]])


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_matches_greedy_reference(models, chat, thinking):
    expected = ref.greedy_chat(models["chat"], FRANCE, enable_thinking=thinking)
    deltas = list(chat.generate(GenerationRequest(messages=FRANCE, temperature=0, max_tokens=32,
                                                  chat_template_kwargs={"enable_thinking": thinking})))
    assert "".join(d.text for d in deltas) == expected["text"]
    last = deltas[-1]
    assert last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (expected["prompt_tokens"], expected["completion_tokens"])
    if thinking:
        # The planted model thinks first; the text arrives in several pieces, not at the end.
        assert expected["text"] == "<think>hmm</think>Paris"
        assert len([d for d in deltas if d.text]) >= 3
    else:
        assert expected["text"] == "Paris" and "<think>\n\n</think>" in expected["prompt"]


def test_chat_stop_string_and_length(chat):
    deltas = list(chat.generate(GenerationRequest(messages=FRANCE, temperature=0, stop=["</think>"])))
    assert "".join(d.text for d in deltas) == "<think>hmm"
    assert deltas[-1].finish_reason == "stop"
    deltas = list(chat.generate(GenerationRequest(messages=FRANCE, temperature=0, max_tokens=2)))
    assert "".join(d.text for d in deltas) == "<think>hmm"
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 2


def test_sampling_seed_is_reproducible(chat):
    def run(seed):
        request = GenerationRequest(prompt="hello world", temperature=1.0, seed=seed, max_tokens=16)
        return "".join(d.text for d in chat.generate(request))

    assert run(7) == run(7)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def test_wrong_model_type_is_a_clear_error(models):
    with pytest.raises(EngineError, match="qwen3-embedding model.*--model-type embedding"):
        load(spec(models["embedding"], ModelType.RERANK))
    with pytest.raises(EngineError, match="qwen3-reranker model.*--model-type rerank"):
        load(spec(models["reranker"], ModelType.EMBEDDING))
    with pytest.raises(EngineError, match="llama.cpp"):
        load(spec(models["reranker_gguf_plain"], ModelType.RERANK))


def test_prompt_too_long_is_an_input_error(models):
    engine = load(ModelSpec(uid="t", model_name="tiny", model_type=ModelType.LLM, model_engine="transformers",
                            model_path=str(models["chat"]), n_ctx=16))
    with pytest.raises(EngineInputError, match="context"):
        list(engine.generate(GenerationRequest(messages=[{"role": "user", "content": "word " * 40}])))
