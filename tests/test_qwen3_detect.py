"""Recognising Qwen3 folders and GGUF rerankers, and the GGUF conversion of the tiny models."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from ragserve.engines import qwen3

pytest.importorskip("transformers")

from qwen3_models import ensure_models  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_models(tmp_path_factory.getbasetemp())


def folder_with_config(root, name, **config):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


QWEN3_CAUSAL = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}


def test_tiny_folders_are_recognised(models):
    chat, emb, rr = (qwen3.detect_hf_folder(models[k]) for k in ("chat", "embedding", "reranker"))
    assert (chat["family"], chat["suggested_type"], chat["rule"]) == ("qwen3", "LLM", "chat")
    assert (emb["family"], emb["suggested_type"], emb["rule"]) == ("qwen3-embedding", "embedding", "last_token")
    assert (rr["family"], rr["suggested_type"], rr["rule"]) == ("qwen3-reranker", "rerank", "yes_no")


def test_markers_other_than_the_name(tmp_path):
    # Qwen3-Embedding ships sentence-transformers files; a neutral folder name must still work.
    st = folder_with_config(tmp_path, "my-model", **QWEN3_CAUSAL)
    (st / "config_sentence_transformers.json").write_text("{}")
    assert qwen3.detect_hf_folder(st)["suggested_type"] == "embedding"
    # Hub caches name the snapshot by commit; the repo folder above carries the name.
    snapshot = folder_with_config(tmp_path, "models--Qwen--Qwen3-Reranker-0.6B/snapshots/" + "a" * 40,
                                  **QWEN3_CAUSAL)
    assert qwen3.detect_hf_folder(snapshot)["suggested_type"] == "rerank"
    seq_cls = folder_with_config(tmp_path, "converted", model_type="qwen3",
                                 architectures=["Qwen3ForSequenceClassification"])
    assert qwen3.detect_hf_folder(seq_cls)["rule"] == "classifier"


def test_other_families_give_no_answer(tmp_path):
    llama = folder_with_config(tmp_path, "Llama-Embedding-Thing", model_type="llama",
                               architectures=["LlamaForCausalLM"])
    result = qwen3.detect_hf_folder(llama)
    assert result["family"] is None and result["suggested_type"] is None
    assert qwen3.detect_hf_folder(tmp_path / "missing")["suggested_type"] is None
    assert qwen3.model_type_mismatch(llama, "rerank") is None


def test_model_type_mismatch_messages(models):
    assert qwen3.model_type_mismatch(models["embedding"], "embedding") is None
    assert qwen3.model_type_mismatch(models["embedding"], "embeddings") is None
    assert qwen3.model_type_mismatch(models["reranker"], "reranker") is None
    assert qwen3.model_type_mismatch(models["chat"], "chat") is None
    message = qwen3.model_type_mismatch(models["reranker"], "LLM")
    assert message and "--model-type rerank" in message and str(models["reranker"]) in message
    message = qwen3.model_type_mismatch(models["chat"], "embedding")
    assert message and "--model-type LLM" in message


def test_gguf_rerank_mode_from_metadata(models):
    assert qwen3.gguf_rerank_mode(models["reranker_gguf_rank"]) == "rank"
    assert qwen3.gguf_rerank_mode(models["reranker_gguf_plain"]) == "yes_no"
    info = qwen3.gguf_info(models["reranker_gguf_rank"])
    assert info["architecture"] == "qwen3" and info["classifier_labels"] == ["yes", "no"]
    assert qwen3.gguf_family(info) == "qwen3-reranker"
    assert qwen3.gguf_family({"architecture": "qwen3", "name": "Qwen3-14B"}) == "qwen3"
    assert qwen3.gguf_family({"architecture": "qwen3", "name": "Qwen3 Embedding 4B"}) == "qwen3-embedding"
    assert qwen3.gguf_family({"architecture": "llama", "name": "reranker"}) is None


def test_gguf_yes_no_ids_match_the_hf_tokenizer(models):
    """The ids the llama.cpp engine scores with are the HF tokenizer's "yes" and "no"."""
    from transformers import AutoTokenizer

    from ragserve.engines.llama_cpp import _read_gguf_metadata

    tokenizer = AutoTokenizer.from_pretrained(models["reranker"])
    expected = {"yes": tokenizer.convert_tokens_to_ids("yes"), "no": tokenizer.convert_tokens_to_ids("no")}
    for kind in ("plain", "rank"):
        ids = _read_gguf_metadata(str(models[f"reranker_gguf_{kind}"]))["token_ids"]
        assert {"yes": ids["yes"], "no": ids["no"]} == expected


def test_rank_gguf_without_name_hint_is_still_rank(models, tmp_path):
    renamed = tmp_path / "model.gguf"
    shutil.copy(models["reranker_gguf_rank"], renamed)
    assert qwen3.gguf_rerank_mode(renamed) == "rank"


@pytest.mark.parametrize("kind", ["plain", "rank"])
def test_converted_gguf_reproduces_reference_in_llama_cpp(models, kind):
    """The conversion itself is right: llama.cpp (f32 KV cache, no flash attention) scores the GGUF
    like the transformers reference, with rank pooling and with the yes/no logits alike."""
    xlc = pytest.importorskip("xllamacpp")
    import qwen3_reference as ref

    query, docs = "what is the capital of France?", ["Paris is the capital of France.", "pandas eat bamboo"]
    expected = [ref.rerank_score(models["reranker"], query, d) for d in docs]
    params = xlc.CommonParams()
    params.model.path = str(models[f"reranker_gguf_{kind}"])
    params.n_ctx = 512
    params.cpuparams.n_threads = 2
    params.verbosity = -1
    params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32
    params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
    if kind == "rank":
        params.embedding = True
        params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_RANK
    server = xlc.Server(params)
    try:
        if kind == "rank":
            result = server.handle_rerank({"query": query, "documents": docs})
            got = {r["index"]: r["relevance_score"] for r in result["results"]}
            scores = [got[0], got[1]]
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(models["reranker"])  # the conversion keeps the ids
            yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
            scores = []
            for doc in docs:
                # Raw log-probabilities of the first generated token over the whole vocabulary.
                result = server.handle_completions({
                    "prompt": qwen3.rerank_prompt(query, doc), "n_predict": 1, "n_probs": 1000,
                    "temperature": 0})
                top = result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                logprob = {t["id"]: t["logprob"] for t in top}
                p_yes, p_no = math.exp(logprob[yes]), math.exp(logprob[no])
                scores.append(p_yes / (p_yes + p_no))
    finally:
        del server
    ref.assert_close(scores, expected)
