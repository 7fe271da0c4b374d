"""What a launched model is: the plain data the gateway, supervisor and worker share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class ModelType(str, Enum):
    LLM = "LLM"
    EMBEDDING = "embedding"
    RERANK = "rerank"

    @classmethod
    def parse(cls, raw: str) -> "ModelType":
        lowered = raw.strip().lower()
        for member in cls:
            if member.value.lower() == lowered:
                return member
        aliases = {"chat": cls.LLM, "llm": cls.LLM, "embed": cls.EMBEDDING, "embeddings": cls.EMBEDDING,
                   "reranker": cls.RERANK, "rerank": cls.RERANK}
        if lowered in aliases:
            return aliases[lowered]
        raise ValueError(f"unknown model type {raw!r}: use one of LLM, embedding, rerank")


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"


@dataclass
class ModelSpec:
    """Everything needed to start one model worker; stored to relaunch after a restart."""

    uid: str
    model_name: str
    model_type: ModelType
    model_engine: str
    model_path: str
    model_format: str | None = None  # gguf, safetensors, pytorch
    quantization: str | None = None
    size_in_billions: float | None = None
    n_ctx: int | None = None
    n_parallel: int | None = None
    # Engine-specific options, e.g. {"rerank_mode": "yes_no"} or {"n_gpu_layers": 0}.
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_type"] = self.model_type.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        data["model_type"] = ModelType.parse(data["model_type"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
