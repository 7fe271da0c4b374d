"""Stopping an embedding (or vLLM rerank) call early, between the engine's internal batches.

The worker passes `should_stop` when every caller of a call has gone (timeouts, closed connections);
the engine must then start no further batch and raise EngineStopped. The engines are real: SmolLM2
GGUF through llama.cpp, the tiny Qwen3-Embedding through transformers, MiniLM and a MiniLM
cross-encoder through the stand-in vLLM server (tests/fake_vllm). `Watched` only counts the calls the
engine makes to its real backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qwen3_reference as ref
from conftest import minilm_path, smollm_gguf_path
from qwen3_models import ensure_models
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.base import EngineStopped

QUERY = "what is the capital of France?"
TEXTS = [f"Text number {i} about Paris, France and the river Seine." * (1 + i % 3) for i in range(6)]
FAKE_VLLM = str(Path(__file__).parent / "fake_vllm")


class Watched:
    """A real backend object, with a count of calls to one of its methods."""

    def __init__(self, real, method: str) -> None:
        self.real, self.method, self.calls = real, method, 0

    def __getattr__(self, name):
        attribute = getattr(self.real, name)
        if name != self.method:
            return attribute

        def counted(*args, **kwargs):
            self.calls += 1
            return attribute(*args, **kwargs)

        return counted


def stop_after(checks: int):
    """A should_stop that says False `checks` times, then True; and the list of its answers."""
    asked: list[bool] = []

    def should_stop() -> bool:
        asked.append(len(asked) >= checks)
        return asked[-1]

    return should_stop, asked


def test_llama_cpp_embedding_stops_between_batches():
    pytest.importorskip("xllamacpp")
    from ragserve.engines.llama_cpp import load

    engine = load(ModelSpec(uid="e", model_name="e", model_type=ModelType.EMBEDDING, model_engine="llama.cpp",
                            model_path=smollm_gguf_path(), n_ctx=512, options={"pooling": "mean"}))
    try:
        engine.max_batch_size = 2
        real = engine.server
        engine.server = Watched(real, "handle_embeddings")
        should_stop, asked = stop_after(1)
        with pytest.raises(EngineStopped):
            engine.embed(TEXTS, should_stop=should_stop)
        assert engine.server.calls == 1 and asked == [False, True]  # 1 of 3 batches ran
        # Unstopped, the batches give what one llama.cpp call over all texts gives.
        whole = sorted(real.handle_embeddings({"input": TEXTS, "encoding_format": "float"})["data"],
                       key=lambda d: d["index"])
        ref.assert_close(engine.embed(TEXTS, should_stop=lambda: False).vectors, [d["embedding"] for d in whole],
                         1e-5)
        assert engine.server.calls == 1 + 3
    finally:
        engine.close()


def test_transformers_embedding_stops_between_batches(tmp_path_factory):
    pytest.importorskip("transformers")
    from ragserve.engines.transformers import load

    models = ensure_models(tmp_path_factory.getbasetemp())
    engine = load(ModelSpec(uid="t", model_name="t", model_type=ModelType.EMBEDDING,
                            model_engine="transformers", model_path=str(models["embedding"]),
                            options={"max_batch_size": 2}))
    try:
        forwards = []
        engine.model.register_forward_hook(lambda *_: forwards.append(1))
        should_stop, asked = stop_after(1)
        with pytest.raises(EngineStopped):
            engine.embed(TEXTS, should_stop=should_stop)
        assert len(forwards) == 1 and asked == [False, True]  # 1 of 3 batches ran
        vectors = engine.embed(TEXTS[:2], should_stop=lambda: False).vectors
        ref.assert_close(vectors, [ref.embedding(models["embedding"], t) for t in TEXTS[:2]])
    finally:
        engine.close()


@pytest.fixture
def fake_vllm(monkeypatch):
    """The stand-in `vllm` package: visible to this process (its metadata) and to the child it starts."""
    pytest.importorskip("sentence_transformers")
    monkeypatch.syspath_prepend(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (FAKE_VLLM, os.environ.get("PYTHONPATH")) if p))


def test_vllm_embedding_and_rerank_stop_between_posts(fake_vllm, tmp_path):
    import torch
    from sentence_transformers import CrossEncoder

    from ragserve.engines.vllm import load

    torch.manual_seed(0)
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(tmp_path))
    specs = [ModelSpec(uid="ve", model_name="ve", model_type=ModelType.EMBEDDING, model_engine="vllm",
                       model_path=minilm_path(), options={"max_batch_size": 2}),
             ModelSpec(uid="vr", model_name="vr", model_type=ModelType.RERANK, model_engine="vllm",
                       model_path=str(tmp_path), options={"max_batch_size": 2})]
    for spec in specs:
        engine = load(spec)
        try:
            engine.server = Watched(engine.server, "post")
            call = (lambda stop: engine.embed(TEXTS, should_stop=stop)) if spec.model_type == ModelType.EMBEDDING \
                else (lambda stop: engine.rerank(QUERY, TEXTS, should_stop=stop))
            should_stop, asked = stop_after(1)
            with pytest.raises(EngineStopped):
                call(should_stop)
            assert engine.server.calls == 1 and asked == [False, True], spec.uid  # 1 of 3 posts ran
        finally:
            engine.close()
