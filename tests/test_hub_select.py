"""Hub IDs, choosing the hub, and choosing one quantization of a GGUF repo (no network)."""

from __future__ import annotations

import pytest

from ragserve.hub import HubError, choose_source, looks_like_hub_id, parse_hub_id
from ragserve.hub.gguf import gguf_choices, pick_files, quant_of


def test_hub_id_versus_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("Qwen/Qwen3-Embedding-4B")
    assert looks_like_hub_id("dengcao/Qwen3-Reranker-4B-GGUF")
    assert looks_like_hub_id("hf:sentence-transformers/all-MiniLM-L6-v2")
    assert looks_like_hub_id("ms:Qwen/Qwen3-14B")
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert not looks_like_hub_id("models/mine")          # an existing local folder wins
    assert not looks_like_hub_id("models/missing.gguf")  # a mistyped file, not a repo
    assert not looks_like_hub_id("./org/name")
    assert not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("just-a-name")
    assert not looks_like_hub_id("a/b/c")


def test_parse_prefix_and_source_order(monkeypatch):
    assert parse_hub_id("hf:org/name").source == "huggingface"
    assert parse_hub_id("modelscope://org/name").repo_id == "org/name"
    with pytest.raises(HubError) as err:
        parse_hub_id("not an id")
    assert err.value.kind == "bad_id"

    monkeypatch.delenv("RAGSERVE_HUB", raising=False)
    assert choose_source() == "modelscope"  # the hub library of the seed guide is installed here
    monkeypatch.setenv("RAGSERVE_HUB", "hf")
    assert choose_source() == "huggingface"
    assert choose_source(hub_id=parse_hub_id("ms:org/name")) == "modelscope"
    assert choose_source("modelscope") == "modelscope"
    with pytest.raises(HubError):
        choose_source("pypi")


@pytest.mark.parametrize("name, quant", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("qwen3-reranker-4b-q4_k_m.gguf", "Q4_K_M"),
    ("Qwen3-Reranker-4B-Q5_K_M-00001-of-00002.gguf", "Q5_K_M"),
    ("model-IQ4_XS.gguf", "IQ4_XS"),
    ("Qwen3-14B-BF16.gguf", "BF16"),
    ("model.gguf", None),
])
def test_quant_names(name, quant):
    assert quant_of(name) == quant


SIZES = {
    "README.md": 10,
    "Reranker-4B-Q4_K_M.gguf": 2_500_000_000,
    "Reranker-4B-Q8_0.gguf": 4_300_000_000,
    "Reranker-4B-F16-00001-of-00002.gguf": 4_000_000_000,
    "Reranker-4B-F16-00002-of-00002.gguf": 4_000_000_000,
    "mmproj-F16.gguf": 100,
}


def test_gguf_pick():
    choices = gguf_choices(SIZES)
    assert sorted(c.label for c in choices) == ["F16", "Q4_K_M", "Q8_0"]  # split parts together, no mmproj
    assert pick_files("o/r", SIZES, quant="q8_0", filename=None) == ["Reranker-4B-Q8_0.gguf"]
    assert pick_files("o/r", SIZES, quant="F16", filename=None) == [
        "Reranker-4B-F16-00001-of-00002.gguf", "Reranker-4B-F16-00002-of-00002.gguf"]
    assert pick_files("o/r", SIZES, quant=None, filename="Reranker-4B-F16-00002-of-00002.gguf")[0].endswith(
        "00001-of-00002.gguf")
    assert pick_files("o/r", {"config.json": 1, "model.safetensors": 2}, quant=None, filename=None) is None

    with pytest.raises(HubError) as err:
        pick_files("o/r", SIZES, quant=None, filename=None)
    assert err.value.kind == "ambiguous_quant"
    assert "--quant Q4_K_M" in err.value.message and "Q8_0" in err.value.message
    with pytest.raises(HubError) as err:
        pick_files("o/r", SIZES, quant="Q2_K", filename=None)
    assert "Q4_K_M" in err.value.message
    with pytest.raises(HubError) as err:
        pick_files("o/r", {"config.json": 1}, quant="Q4_K_M", filename=None)
    assert err.value.kind == "no_gguf"
    with pytest.raises(HubError) as err:
        pick_files("o/r", SIZES, quant=None, filename="nope.gguf")
    assert err.value.kind == "file_not_found" and "Reranker-4B-Q8_0.gguf" in err.value.message


@pytest.mark.parametrize("text", ["../x", "org/..", "org/../x", "hf:../x", "ms:org/..", "/etc/passwd", "org/.",
                                  "org\\name", "org/na\0me", "..\\..\\x"])
def test_ids_that_could_traverse_are_not_hub_ids(text):
    assert not looks_like_hub_id(text)
    with pytest.raises(HubError) as err:
        parse_hub_id(text)
    assert err.value.kind == "bad_id"


def test_store_folder_stays_in_the_store(tmp_path):
    from ragserve.hub import model_dir
    from ragserve.settings import resolve_home

    home = resolve_home(tmp_path / "home")
    assert model_dir(home, "huggingface", "org/name", "refs/pr/1") == home.models / "huggingface/org/name@refs--pr--1"
    for source, repo_id in (("huggingface", "../../x"), ("../..", "org/name"), ("modelscope", "org/..")):
        with pytest.raises(HubError) as err:
            model_dir(home, source, repo_id)
        assert err.value.kind == "bad_id"
