"""Engine catalogue: which engine serves which model types and formats, and how to load it.

Engine modules are imported only inside the worker that uses them, so the gateway stays
light and a missing extra is a clear launch error instead of an import crash.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.base import Engine, EngineError


@dataclass(frozen=True)
class EngineInfo:
    name: str
    module: str  # ragserve.engines.<file>, which defines load(spec) -> Engine
    model_types: frozenset[ModelType]
    formats: frozenset[str]
    requires: tuple[str, ...]  # importable top-level packages
    extra: str  # pip extra that installs them

    def missing_packages(self) -> list[str]:
        return [pkg for pkg in self.requires if importlib.util.find_spec(pkg) is None]

    def install_hint(self) -> str:
        return f"pip install 'ragserve[{self.extra}]'"


ENGINES: dict[str, EngineInfo] = {
    info.name: info
    for info in (
        EngineInfo("llama.cpp", "ragserve.engines.llama_cpp",
                   frozenset(ModelType), frozenset({"gguf"}), ("xllamacpp",), "llama"),
        EngineInfo("sentence_transformers", "ragserve.engines.sentence_transformers",
                   frozenset({ModelType.EMBEDDING, ModelType.RERANK}), frozenset({"safetensors", "pytorch"}),
                   ("sentence_transformers", "torch"), "st"),
        EngineInfo("transformers", "ragserve.engines.transformers",
                   frozenset(ModelType), frozenset({"safetensors", "pytorch"}),
                   ("transformers", "torch"), "transformers"),
        EngineInfo("vllm", "ragserve.engines.vllm",
                   frozenset(ModelType), frozenset({"safetensors", "pytorch", "gguf", "awq", "gptq"}),
                   ("vllm",), "vllm"),
    )
}

ENGINE_ALIASES = {
    "llama_cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "xllamacpp": "llama.cpp",
    "sentence-transformers": "sentence_transformers", "st": "sentence_transformers",
    "hf": "transformers", "pytorch": "transformers",
}


def canonical_engine_name(raw: str) -> str:
    name = ENGINE_ALIASES.get(raw.strip().lower(), raw.strip())
    if name not in ENGINES:
        raise EngineError(
            f"unknown model engine {raw!r}: use one of {', '.join(ENGINES)} (or leave it out to choose automatically)"
        )
    return name


def load_engine(spec: ModelSpec) -> Engine:
    info = ENGINES[canonical_engine_name(spec.model_engine)]
    missing = info.missing_packages()
    if missing:
        raise EngineError(
            f"engine {info.name} needs {', '.join(missing)}, which is not installed: run {info.install_hint()}"
        )
    module = importlib.import_module(info.module)
    return module.load(spec)
