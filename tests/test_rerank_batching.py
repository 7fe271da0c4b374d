"""Rerank batching on llama.cpp's yes/no rule, and stopping a rerank or embedding call early.

fast (the default) must run documents on parallel slots and reuse the judging prompt's cached prefix;
llama.cpp itself reports both (requests in flight at once, `timings.cache_n` tokens taken from a
slot's cache). exact runs one document at a time from scratch. The engines are real (tiny Qwen3 GGUF
in f32, the MiniLM cross-encoder and embedder); `server` below only watches the calls the engine
makes to the real llama.cpp server.
"""

from __future__ import annotations

import threading
import time

import pytest

import qwen3_reference as ref
from conftest import minilm_path
from qwen3_models import ensure_models
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.base import EngineError, EngineStopped

QUERY = "what is the capital of France?"
WORDS = "Paris France capital city river Seine Berlin Germany Tokyo Japan query document passage".split()
DOCS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + 7 * i)) for i in range(12)]
EXACT_LLAMA = {"flash_attn": "off", "cache_type_k": "f32", "cache_type_v": "f32"}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_models(tmp_path_factory.getbasetemp())


class Watched:
    """The real llama.cpp server, with the time span and llama.cpp's timings of each completion."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls: list[tuple[float, float, dict]] = []
        self.lock = threading.Lock()

    def handle_completions(self, payload, *args):
        started = time.monotonic()
        result = self.real.handle_completions(payload, *args)
        with self.lock:
            self.calls.append((started, time.monotonic(), result.get("timings") or {}))
        return result

    def __getattr__(self, name):
        return getattr(self.real, name)

    def most_at_once(self) -> int:
        events = sorted([(s, 1) for s, _, _ in self.calls] + [(e, -1) for _, e, _ in self.calls])
        now = best = 0
        for _, step in events:
            now += step
            best = max(best, now)
        return best


def gguf_reranker(models, **options):
    from ragserve.engines.llama_cpp import load

    spec = ModelSpec(uid="r", model_name="r", model_type=ModelType.RERANK, model_engine="llama.cpp",
                     model_path=str(models["reranker_gguf_plain"]), n_ctx=1024, options={**EXACT_LLAMA, **options})
    engine = load(spec)
    engine.server = Watched(engine.server)
    return engine


def test_fast_is_the_default_parallel_slots_share_the_cached_prefix(models):
    engine = gguf_reranker(models)
    assert engine.describe()["rerank_batching"] == "fast"
    scores = engine.rerank(QUERY, DOCS).scores
    calls = engine.server.calls
    assert len(calls) == len(DOCS)
    assert engine.server.most_at_once() >= 2
    # Every document after the first on its slot starts from the slot's cached query prefix.
    cached = [timings.get("cache_n", 0) for _, _, timings in calls]
    assert sum(c >= 40 for c in cached) >= len(DOCS) - engine.n_parallel, cached
    # In f32 with exact attention the parallel, cached evaluation agrees with the reference.
    ref.assert_close(scores, [ref.rerank_score(models["reranker"], QUERY, d) for d in DOCS])


def test_exact_runs_one_document_at_a_time_from_scratch(models):
    engine = gguf_reranker(models, rerank_batching="exact")
    scores = engine.rerank(QUERY, DOCS[:4]).scores
    assert engine.server.most_at_once() == 1
    assert all(timings.get("cache_n", 0) == 0 for _, _, timings in engine.server.calls)
    ref.assert_close(scores, [ref.rerank_score(models["reranker"], QUERY, d) for d in DOCS[:4]])


def test_unknown_batching_and_exact_with_slots_are_load_errors(models):
    with pytest.raises(EngineError, match="rerank_batching 'quick' is unknown: use 'fast'"):
        gguf_reranker(models, rerank_batching="quick")
    with pytest.raises(EngineError, match="leave n_parallel out"):
        gguf_reranker(models, rerank_batching="exact", n_parallel=4)


@pytest.mark.parametrize("batching", ["fast", "exact"])
def test_should_stop_ends_a_rerank_at_the_next_document(models, batching):
    engine = gguf_reranker(models, rerank_batching=batching)
    asked = []
    with pytest.raises(EngineStopped):
        engine.rerank(QUERY, DOCS, should_stop=lambda: asked.append(1) or len(asked) > 3)
    engine.pool.shutdown(wait=True)  # documents already on a slot finish...
    assert len(engine.server.calls) == 3  # ...and none starts once should_stop said so


def test_should_stop_ends_cross_encoder_and_embedding_calls_between_batches(tmp_path):
    import torch
    from sentence_transformers import CrossEncoder

    from ragserve.engines.sentence_transformers import load

    torch.manual_seed(0)
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(tmp_path))
    cross = load(ModelSpec(uid="c", model_name="c", model_type=ModelType.RERANK,
                           model_engine="sentence_transformers", model_path=str(tmp_path), options={"batch_size": 2}))
    embedder = load(ModelSpec(uid="e", model_name="e", model_type=ModelType.EMBEDDING,
                              model_engine="sentence_transformers", model_path=minilm_path(),
                              options={"batch_size": 2}))
    for call in (lambda stop: cross.rerank(QUERY, DOCS, should_stop=stop),
                 lambda stop: embedder.embed(DOCS, should_stop=stop)):
        asked = []
        with pytest.raises(EngineStopped):
            call(lambda: asked.append(1) or len(asked) > 2)
        assert len(asked) == 3  # asked before each batch of 2: two ran, the third never started
    # Unstopped, the batched calls give what one predict/encode over all texts gives.
    whole = CrossEncoder(str(tmp_path), device="cpu").predict([(QUERY, d) for d in DOCS])
    ref.assert_close(cross.rerank(QUERY, DOCS, should_stop=lambda: False).scores, [float(s) for s in whole], 1e-5)
