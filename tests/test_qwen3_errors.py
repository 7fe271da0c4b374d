"""Damaged model files are errors that name the file and the fix, on every path that reads them
(the GGUF header reader, family detection at launch, the engines), never a quiet switch to
another rule."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import smollm_gguf_path
from qwen3_models import ensure_layout_models
from ragserve.control.resolve import LaunchError, build_spec
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.base import EngineError
from ragserve.engines.gguf_meta import GGUFFormatError, read_gguf_header


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ensure_layout_models(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("size", [0, 3, 4096])
def test_cut_gguf_header_names_the_file_and_the_fix(tmp_path, size):
    cut = tmp_path / "model.gguf"
    cut.write_bytes(Path(smollm_gguf_path()).read_bytes()[:size])
    with pytest.raises(GGUFFormatError, match=re.escape(str(cut)) + ".*(pull the model again|point --model-path)"):
        read_gguf_header(cut, keep_arrays=("tokenizer.ggml.tokens",))


def test_llama_cpp_engine_refuses_a_cut_gguf(tmp_path):
    from ragserve.engines.llama_cpp import load

    cut = tmp_path / "Qwen3-Reranker-4B-q4_k_m.gguf"
    cut.write_bytes(Path(smollm_gguf_path()).read_bytes()[:4096])
    spec = ModelSpec(uid="cut", model_name="cut", model_type=ModelType.RERANK, model_engine="llama.cpp",
                     model_path=str(cut), model_format="gguf")
    with pytest.raises(EngineError, match=re.escape(str(cut)) + ".*pull the model again"):
        load(spec)


@pytest.mark.parametrize("damaged", ["modules.json", "1_Pooling/config.json", "config.json"])
def test_launch_of_a_damaged_qwen3_folder_names_the_file(models, tmp_path, damaged):
    """A damaged sentence-transformers file must not turn a Qwen3-Embedding into a chat model."""
    folder = tmp_path / "download"
    shutil.copytree(models["embedding_neutral"], folder)
    (folder / damaged).write_text('{"truncated": ')
    with pytest.raises(LaunchError, match=re.escape(str(folder / damaged)) + ".*pull the model again"):
        build_spec(uid=None, model_name="e", model_type="embedding", model_engine=None, model_path=str(folder))
