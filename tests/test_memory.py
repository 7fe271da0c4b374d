"""Memory planning on real files (SmolLM2 GGUF, MiniLM safetensors, a real Qwen3-14B config.json),
and end to end: a launch over the budget gets a 400 with the figures, and passes with force."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest

from conftest import minilm_path, smollm_gguf_path, start_server, stop_server
from ragserve.control import memory
from ragserve.control.memory import GiB, InsufficientMemory, MemoryFigures
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.gguf_meta import read_gguf_header

# Qwen/Qwen3-14B config.json (the fields the estimate reads, as published).
QWEN3_14B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_size": 5120, "intermediate_size": 17408,
    "max_position_embeddings": 40960, "model_type": "qwen3", "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
}


def smol_spec(uid: str = "smol", **kw) -> ModelSpec:
    kw.setdefault("model_type", ModelType.LLM)
    return ModelSpec(uid=uid, model_name=uid, model_engine="llama.cpp", model_path=smollm_gguf_path(),
                     model_format="gguf", **kw)


def gpu(total_gib: float) -> MemoryFigures:
    """A GPU of this size with nothing on it (the planning rule is what is tested, not this machine)."""
    return MemoryFigures("gpu", f"GPU 0 ({total_gib:g} GiB card)", int(total_gib * GiB), int(total_gib * GiB),
                         source="given")


def qwen14b_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "Qwen3-14B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_14B_CONFIG))
    return folder


# ---- estimates from real files -----------------------------------------------------------------

def test_gguf_weights_are_the_file_size_and_kv_follows_the_header():
    path = smollm_gguf_path()
    meta, _ = read_gguf_header(path)
    per_token = (meta["llama.block_count"] * meta["llama.attention.head_count_kv"]
                 * (meta["llama.embedding_length"] // meta["llama.attention.head_count"]) * 2 * 2)
    est = memory.estimate(smol_spec(n_ctx=2048))
    assert est.weights_bytes == os.path.getsize(path)
    assert est.weights_dtype == "Q4_1"  # general.file_type 3
    assert 0.12 < est.params_billions < 0.17  # SmolLM2-135M, counted from the tensor table
    assert est.kv_tokens == 2048
    assert est.kv_cache_bytes == per_token * 2048 == 30 * 3 * 64 * 2 * 2 * 2048
    assert est.total_bytes > est.weights_bytes + est.kv_cache_bytes  # plus the worker's own memory
    # Without n_ctx the llama.cpp chat default (4096) is what gets allocated.
    assert memory.estimate(smol_spec()).kv_tokens == 4096


def test_yes_no_reranker_allocates_a_context_per_slot():
    est = memory.estimate(smol_spec(model_type=ModelType.RERANK, n_ctx=1024, n_parallel=2,
                                    options={"rerank_mode": "yes_no"}))
    assert est.kv_tokens == 2048
    assert est.kv_cache_bytes == memory.estimate(smol_spec(n_ctx=2048)).kv_cache_bytes
    # The default (fast) batching keeps 4 slots; exact mode runs one document at a time in one slot.
    fast = memory.estimate(smol_spec(model_type=ModelType.RERANK, n_ctx=1024, options={"rerank_mode": "yes_no"}))
    exact = memory.estimate(smol_spec(model_type=ModelType.RERANK, n_ctx=1024,
                                      options={"rerank_mode": "yes_no", "rerank_batching": "exact"}))
    assert (fast.kv_tokens, exact.kv_tokens) == (4096, 1024)


def test_safetensors_params_are_read_from_the_headers():
    spec = ModelSpec(uid="minilm", model_name="minilm", model_type=ModelType.EMBEDDING,
                     model_engine="sentence_transformers", model_path=minilm_path(), model_format="safetensors")
    est = memory.estimate(spec)
    disk = os.path.getsize(Path(minilm_path()) / "model.safetensors")
    assert 0.020 < est.params_billions < 0.025  # all-MiniLM-L6-v2: 22.7 M
    assert est.weights_dtype == "float32"  # what the engine loads on a CPU
    assert abs(est.weights_bytes - disk) / disk < 0.01
    assert est.kv_tokens == 0  # an encoder keeps no KV cache


def test_qwen3_14b_params_from_config_and_size_in_billions_alone(tmp_path):
    folder = qwen14b_folder(tmp_path)
    spec = ModelSpec(uid="q", model_name="q", model_type=ModelType.LLM, model_engine="vllm", model_path=str(folder),
                     model_format="safetensors", size_in_billions=14, n_ctx=8192)
    est = memory.estimate(spec)
    assert 14.6 < est.params_billions < 14.9  # Qwen3-14B has 14.8 B parameters
    assert est.weights_dtype == "bfloat16" and est.device == "gpu"
    assert 27 * GiB < est.weights_bytes < 28 * GiB
    assert est.kv_cache_bytes == 40 * 8 * 128 * 2 * 2 * 8192  # 1.25 GiB at f16
    bare = tmp_path / "bare"
    bare.mkdir()
    only_size = memory.estimate(ModelSpec(uid="b", model_name="b", model_type=ModelType.LLM, model_engine="vllm",
                                          model_path=str(bare), model_format="safetensors", size_in_billions=14))
    assert only_size.weights_bytes == 28 * 10 ** 9 and only_size.weights_source == "size_in_billions"


# ---- the check ---------------------------------------------------------------------------------

def test_seed_case_qwen3_14b_bf16_is_refused_on_a_24_gib_gpu_with_what_fits(tmp_path):
    spec = ModelSpec(uid="qwen3-14b-chat-local", model_name="qwen3-14b-chat-local", model_type=ModelType.LLM,
                     model_engine="vllm", model_path=str(qwen14b_folder(tmp_path)), model_format="safetensors",
                     size_in_billions=14)
    with pytest.raises(InsufficientMemory) as caught:
        memory.check_fits(spec, figures=gpu(24))
    message = str(caught.value)
    assert "qwen3-14b-chat-local" in message
    assert re.search(r"weights 27\.\d GiB", message)
    assert "24.0 GiB total" in message
    assert "Q4_K_M" in message and "Q5_K_M" in message
    assert "Qwen3-8B" in message
    # The suggestion is real: the Q4_K_M GGUF it names does fit the same GPU.
    q4 = ModelSpec(uid="q4", model_name="q4", model_type=ModelType.LLM, model_engine="llama.cpp",
                   model_path=str(tmp_path / "missing" / "Qwen3-14B-Q4_K_M.gguf"), model_format="gguf",
                   quantization="Q4_K_M", size_in_billions=14.77)
    fits = memory.check_fits(q4, figures=gpu(24))
    assert fits.total_bytes < 24 * GiB
    # And the same bf16 model fits an 80 GiB card.
    assert memory.check_fits(spec, figures=gpu(80)).total_bytes < 80 * GiB


def test_context_too_long_suggests_an_n_ctx_that_fits():
    spec = smol_spec(n_ctx=131072)  # 2.8 GiB of KV cache for a 94 MiB model
    figures = MemoryFigures("cpu", "RAM", 1 * GiB, 1 * GiB, source="given")
    with pytest.raises(InsufficientMemory) as caught:
        memory.check_fits(spec, figures=figures)
    found = re.search(r"n_ctx (\d+) \(now 131072", str(caught.value))
    assert found, str(caught.value)
    suggested = int(found.group(1))
    assert memory.check_fits(smol_spec(n_ctx=suggested), figures=figures) is not None


def test_models_planned_before_count_against_the_budget():
    figures = MemoryFigures("cpu", "RAM", 4 * GiB, 4 * GiB, source="given")
    one = memory.estimate(smol_spec(n_ctx=512)).total_bytes
    figures.free_bytes = int(one * 1.5)
    memory.check_fits(smol_spec("a", n_ctx=512), figures=figures)
    with pytest.raises(InsufficientMemory, match="planned before it in this stack: a"):
        memory.check_fits(smol_spec("b", n_ctx=512), also=[smol_spec("a", n_ctx=512)], figures=figures)


def test_available_reports_ram_and_the_limit(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "0.5")
    figures = memory.available("cpu")
    assert figures.device == "cpu" and figures.total_bytes > 0
    assert figures.limit_bytes == GiB // 2
    assert figures.budget_bytes <= GiB // 2


# ---- end to end: the gateway refuses with figures, force overrides ------------------------------

def test_launch_over_the_budget_is_refused_with_figures_and_passes_with_force(tmp_path):
    one = memory.estimate(smol_spec(n_ctx=512)).total_bytes
    limit_gb = one * 1.5 / GiB  # room for one such model, not two
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(home, env={memory.LIMIT_ENV: f"{limit_gb:.4f}"})
    try:
        payload = {"model_type": "LLM", "model_engine": "llama.cpp", "model_path": smollm_gguf_path(), "n_ctx": 512}
        first = httpx.post(f"{server.url}/v1/models", json={**payload, "model_name": "smol-a"}, timeout=300)
        assert first.status_code == 200, first.text
        second = httpx.post(f"{server.url}/v1/models", json={**payload, "model_name": "smol-b"}, timeout=300)
        assert second.status_code == 400
        error = second.json()["error"]
        assert error["code"] == "insufficient_memory"
        assert "not enough memory for 'smol-b'" in error["message"]
        assert memory.LIMIT_ENV in error["message"]
        assert "smol-a" in error["message"]  # what already holds the budget
        assert "force" in error["message"]
        listed = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["smol-a"]  # nothing was started for the refused launch
        forced = httpx.post(f"{server.url}/v1/models", json={**payload, "model_name": "smol-b", "force": True},
                            timeout=300)
        assert forced.status_code == 200, forced.text
        assert httpx.get(f"{server.url}/v1/models/smol-b").json()["state"] == "ready"
    finally:
        stop_server(server.process)


# ---- files that cannot be read are errors, never "launch without the check" --------------------

def test_truncated_gguf_is_an_error_naming_the_file_and_the_pull(tmp_path):
    cut = tmp_path / "Qwen3-Reranker-4B-q4_k_m.gguf"
    cut.write_bytes(Path(smollm_gguf_path()).read_bytes()[:4096])  # a download cut inside the header
    spec = ModelSpec(uid="cut", model_name="cut", model_type=ModelType.RERANK, model_engine="llama.cpp",
                     model_path=str(cut), model_format="gguf")
    with pytest.raises(memory.EstimateError, match=re.escape(str(cut)) + ".*pull the model again.*--force"):
        memory.check_fits(spec, figures=gpu(80))


def test_damaged_config_or_safetensors_header_is_an_error(tmp_path):
    folder = qwen14b_folder(tmp_path)
    spec = ModelSpec(uid="q", model_name="q", model_type=ModelType.LLM, model_engine="transformers",
                     model_path=str(folder))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(memory.EstimateError, match="model-00001-of-00002.safetensors.*pull the model again"):
        memory.check_fits(spec, figures=gpu(80))
    (folder / "model-00001-of-00002.safetensors").unlink()
    (folder / "config.json").write_text('{"model_type": "qwen3", ')
    with pytest.raises(memory.EstimateError, match="config.json is not readable JSON"):
        memory.check_fits(spec, figures=gpu(80))


def test_memory_limit_that_is_not_a_number_is_an_error(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "twenty")
    with pytest.raises(memory.EstimateError, match="RAGSERVE_MEMORY_LIMIT_GB='twenty'"):
        memory.check_fits(smol_spec())


def test_launch_whose_estimate_cannot_be_made_is_a_400_naming_the_cause_and_passes_with_force(tmp_path):
    """The gateway maps EstimateError to a 400 (not a 500, not a launch without the check)."""
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(home, env={memory.LIMIT_ENV: "twenty"})
    try:
        payload = {"model_type": "LLM", "model_engine": "llama.cpp", "model_path": smollm_gguf_path(),
                   "n_ctx": 512, "model_name": "smol-x"}
        refused = httpx.post(f"{server.url}/v1/models", json=payload, timeout=300)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "memory_estimate_failed"
        assert "RAGSERVE_MEMORY_LIMIT_GB='twenty'" in error["message"] and "force" in error["message"]
        assert httpx.get(f"{server.url}/v1/models").json()["data"] == []
        forced = httpx.post(f"{server.url}/v1/models", json={**payload, "force": True}, timeout=300)
        assert forced.status_code == 200, forced.text
    finally:
        stop_server(server.process)
