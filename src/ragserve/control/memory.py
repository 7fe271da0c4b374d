"""Memory planning: how much a model will take, how much is free, and what fits instead.

A launch that cannot fit is refused before any worker starts, with the figures and a
suggestion (a smaller quantization, a smaller size, a shorter context) instead of an
out-of-memory crash minutes into loading. The estimate is read from the model's own files:

  weights  = the GGUF file size, or the safetensors parameter count x the dtype the engine
             loads (float32 on CPU for the torch engines), or size_in_billions x bytes per
             weight of the dtype/quantization when only config.json is there;
  KV cache = layers x KV heads x head dim x 2 (K and V) x 2 bytes (f16) x the tokens the
             engine allocates (n_ctx, times n_parallel where slots do not share it);
  runtime  = the worker process / CUDA context plus compute buffers.

Free memory is the first visible GPU (nvidia-smi, else torch.cuda when a driver exists) or
RAM (psutil), minus what ragserve workers that are still loading have yet to take.
RAGSERVE_MEMORY_LIMIT_GB caps the budget (a share of a shared server; also used by tests).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

# Defaults the engines use when the launch gives no n_ctx.
from ragserve.engines.defaults import LLAMA_CHAT_CTX, LLAMA_EMBED_CTX, TORCH_MAX_LENGTH, llama_rerank_slots
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines.qwen3 import Family, family_from_name

log = logging.getLogger("ragserve.memory")

GiB = 1024 ** 3
MiB = 1024 ** 2
LIMIT_ENV = "RAGSERVE_MEMORY_LIMIT_GB"

# Effective bits per weight of GGUF quantizations (file size x 8 / parameters, measured on
# typical 7B-14B conversions; embeddings and norms make them a little above the nominal bits).
GGUF_BPW: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_1": 6.0, "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.64, "Q4_1": 5.0, "Q4_0": 4.6, "IQ4_XS": 4.43,
    "IQ4_NL": 4.6, "Q3_K_L": 4.3, "Q3_K_M": 3.95, "Q3_K_S": 3.6, "IQ3_M": 3.7, "IQ3_S": 3.5, "IQ3_XS": 3.4,
    "IQ3_XXS": 3.2, "Q2_K": 3.11, "Q2_K_S": 2.9, "IQ2_M": 2.8, "IQ2_S": 2.6, "IQ2_XS": 2.4, "IQ2_XXS": 2.2,
    "IQ1_M": 1.9, "IQ1_S": 1.7,
}
# llama.cpp's llama_ftype numbers (general.file_type in a GGUF header).
GGUF_FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
DTYPE_BYTES: dict[str, float] = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}
# Xinference-style quantization names for safetensors models (bitsandbytes, AWQ, GPTQ, FP8).
PACKED_QUANT_BPW: dict[str, float] = {
    "4-bit": 4.25, "int4": 4.25, "awq": 4.25, "gptq": 4.25, "gptq-int4": 4.25, "awq-int4": 4.25,
    "8-bit": 8.25, "int8": 8.25, "gptq-int8": 8.25, "fp8": 8.0,
}
# Quantizations offered as alternatives, best quality first.
SUGGESTED_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")

# Qwen3 sizes (nominal -> parameters in billions, layers, hidden, intermediate), for planning before
# the files are pulled and for "a smaller size fits" advice. KV heads 8 and head dim 128 for all.
# Keyed by the one family vocabulary (ragserve.engines.qwen3.Family); SIZE_NAMES is how hubs spell them.
QWEN3_SIZES: dict[Family, list[tuple[str, float, int, int, int]]] = {
    Family.CHAT: [("32B", 32.76, 64, 5120, 25600), ("14B", 14.77, 40, 5120, 17408), ("8B", 8.19, 36, 4096, 12288),
              ("4B", 4.02, 36, 2560, 9728), ("1.7B", 2.03, 28, 2048, 6144), ("0.6B", 0.75, 28, 1024, 3072)],
    Family.EMBEDDING: [("8B", 7.57, 36, 4096, 12288), ("4B", 4.02, 36, 2560, 9728), ("0.6B", 0.6, 28, 1024, 3072)],
    Family.RERANKER: [("8B", 8.19, 36, 4096, 12288), ("4B", 4.02, 36, 2560, 9728), ("0.6B", 0.6, 28, 1024, 3072)],
}
SIZE_NAMES = {Family.CHAT: "Qwen3", Family.EMBEDDING: "Qwen3-Embedding", Family.RERANKER: "Qwen3-Reranker"}


class InsufficientMemory(Exception):
    """The model will not fit; the message gives the figures and what would fit instead."""

    def __init__(self, message: str, estimate: "MemoryEstimate | None" = None,
                 figures: "MemoryFigures | None" = None, suggestions: list[str] | None = None):
        super().__init__(message)
        self.estimate = estimate
        self.figures = figures
        self.suggestions = list(suggestions or [])


class EstimateError(ValueError):
    """The estimate cannot be made from the model's files (damaged config, header or setting): the
    message names the file and the fix. Never a silent launch without the check."""


def gib(n: float) -> str:
    if n >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


# ---- the estimate ------------------------------------------------------------------------------

@dataclass
class Architecture:
    """What the KV cache and activations depend on; None where the files do not say."""

    layers: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim_k: Optional[int] = None
    head_dim_v: Optional[int] = None
    hidden: Optional[int] = None
    intermediate: Optional[int] = None
    vocab: Optional[int] = None
    heads: Optional[int] = None
    trained_ctx: Optional[int] = None
    tied_embeddings: bool = False
    decoder: bool = True  # encoder-only models (BERT family) keep no KV cache
    name: str = ""

    @property
    def kv_bytes_per_token(self) -> Optional[int]:
        if not (self.layers and self.kv_heads and self.head_dim_k):
            return None
        return self.layers * self.kv_heads * (self.head_dim_k + (self.head_dim_v or self.head_dim_k)) * 2


@dataclass
class MemoryEstimate:
    uid: str
    device: str  # "gpu" or "cpu": where the weights and the KV cache go
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    params_billions: Optional[float]
    weights_dtype: str  # "bfloat16", "float32", "Q4_K_M", ...
    weights_source: str  # how the weight figure was found
    n_ctx: Optional[int]
    kv_tokens: int
    engine: str
    arch: Architecture = field(default_factory=Architecture)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def breakdown(self) -> str:
        params = f"{self.params_billions:.2f} B params, " if self.params_billions else ""
        if self.kv_tokens:
            kv = f"KV cache {gib(self.kv_cache_bytes)} ({self.kv_tokens} tokens, f16)"
        else:
            kv = f"activations {gib(self.kv_cache_bytes)} (n_ctx {self.n_ctx})"
        return (f"weights {gib(self.weights_bytes)} ({params}{self.weights_dtype}, {self.weights_source}), {kv}, "
                f"runtime {gib(self.overhead_bytes)}")

    def to_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "device": self.device, "total_bytes": self.total_bytes,
                "weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "overhead_bytes": self.overhead_bytes, "params_billions": self.params_billions,
                "weights_dtype": self.weights_dtype, "weights_source": self.weights_source, "n_ctx": self.n_ctx,
                "kv_tokens": self.kv_tokens, "engine": self.engine, "notes": list(self.notes)}


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON file, or {} when it does not exist; a damaged file is an EstimateError."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EstimateError(f"{path} is not readable JSON ({exc}): the download is damaged; pull the model "
                            f"again") from exc


def _gguf_shards(path: Path) -> list[Path]:
    match = re.search(r"-(\d+)-of-(\d+)\.gguf$", path.name)
    if not match:
        return [path]
    stem = path.name[:match.start()]
    shards = sorted(path.parent.glob(f"{glob_escape(stem)}-*-of-{match.group(2)}.gguf"))
    return shards or [path]


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _gguf_facts(path: Path) -> tuple[Architecture, Optional[str], Optional[float], bool]:
    """(architecture, quantization name, parameters in billions, has a classifier head)."""
    from ragserve.engines.gguf_meta import GGUFFormatError, gguf_facts

    try:
        facts = gguf_facts(path)
    except GGUFFormatError as exc:  # names the file and the fix
        raise EstimateError(str(exc)) from exc
    meta, tensors = facts["fields"], facts["tensors"]
    arch_name = facts["architecture"]

    def key(name: str) -> Any:
        return meta.get(f"{arch_name}.{name}")

    heads = key("attention.head_count")
    kv_heads = key("attention.head_count_kv") or heads
    if isinstance(kv_heads, list):  # per-layer lists (some architectures): take the largest
        kv_heads = max(kv_heads) if kv_heads else None
    if isinstance(heads, list):
        heads = max(heads) if heads else None
    hidden = key("embedding_length")
    head_k = key("attention.key_length") or (hidden // heads if hidden and heads else None)
    head_v = key("attention.value_length") or head_k
    arch = Architecture(layers=key("block_count"), kv_heads=kv_heads, head_dim_k=head_k, head_dim_v=head_v,
                        hidden=hidden, intermediate=key("feed_forward_length"), heads=heads,
                        trained_ctx=key("context_length"), decoder=key("pooling_type") in (None, 0, 3),
                        name=str(meta.get("general.name") or path.stem))
    if arch_name in ("bert", "nomic-bert", "jina-bert-v2", "xlm-roberta", "t5encoder"):
        arch.decoder = False
    quant = GGUF_FILE_TYPES.get(int(meta["general.file_type"])) if "general.file_type" in meta else None
    params = sum(math.prod(dims) for dims in tensors.values()) / 1e9 if tensors else None
    return arch, quant, params, facts["has_classifier"]


def _config_arch(config: dict[str, Any]) -> Architecture:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = text.get("num_attention_heads") or text.get("n_head")
    hidden = text.get("hidden_size") or text.get("n_embd") or text.get("d_model")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    architectures = config.get("architectures") or []
    decoder = any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures) or \
        text.get("model_type", "") in ("qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")
    return Architecture(
        layers=text.get("num_hidden_layers") or text.get("n_layer"),
        kv_heads=text.get("num_key_value_heads") or heads, head_dim_k=head_dim, head_dim_v=head_dim,
        hidden=hidden, intermediate=text.get("intermediate_size") or text.get("n_inner"),
        vocab=text.get("vocab_size"), heads=heads,
        trained_ctx=text.get("max_position_embeddings") or text.get("n_positions") or text.get("seq_length"),
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        decoder=decoder, name=str(config.get("_name_or_path") or ""),
    )


def params_from_config(arch: Architecture) -> Optional[float]:
    """Parameters (billions) of a dense transformer from its config: attention, gated MLP, embeddings."""
    if not (arch.layers and arch.hidden and arch.intermediate and arch.vocab and arch.heads and arch.head_dim_k):
        return None
    q_out = arch.heads * arch.head_dim_k
    kv_out = (arch.kv_heads or arch.heads) * arch.head_dim_k
    attention = arch.hidden * q_out * 2 + arch.hidden * kv_out * 2
    mlp = 3 * arch.hidden * arch.intermediate if arch.decoder else 2 * arch.hidden * arch.intermediate
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
    return (arch.layers * (attention + mlp) + embeddings) / 1e9


def _safetensors_params(folder: Path) -> tuple[Optional[float], Optional[str], int]:
    """(parameters in billions, stored dtype, bytes on disk) from the safetensors headers alone."""
    count = 0
    dtypes: dict[str, int] = {}
    disk = 0
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        disk += path.stat().st_size
        try:
            with open(path, "rb") as fh:
                length, = struct.unpack("<Q", fh.read(8))
                if length > 100 * MiB:
                    raise ValueError(f"header length {length} is not plausible")
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise EstimateError(f"{path} has no readable safetensors header ({exc}): the download is damaged or "
                                f"cut; pull the model again") from exc
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            n = math.prod(info.get("shape") or [1])
            count += n
            dtypes[info.get("dtype", "")] = dtypes.get(info.get("dtype", ""), 0) + n
    if not files or not count:
        return None, None, disk
    stored = max(dtypes, key=dtypes.get)
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8", "I8": "int8"}
    return count / 1e9, names.get(stored, stored.lower()), disk


def gpu_visible() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").exists()


def _device_for(spec: ModelSpec) -> str:
    opts = spec.options or {}
    device = str(opts.get("device", ""))
    if device.startswith("cpu"):
        return "cpu"
    if device.startswith("cuda") or spec.model_engine == "vllm":  # vLLM runs on the GPU only
        return "gpu"
    if spec.model_engine == "llama.cpp" and int(opts.get("n_gpu_layers", -1) or 0) == 0 \
            and "n_gpu_layers" in opts:
        return "cpu"
    return "gpu" if gpu_visible() else "cpu"


def _torch_load_dtype(spec: ModelSpec, device: str, stored: Optional[str]) -> str:
    """The dtype the torch engines load in (see ragserve.engines.transformers / sentence_transformers)."""
    requested = spec.options.get("torch_dtype") or spec.options.get("dtype")
    if requested and requested != "auto":
        return str(requested).replace("torch.", "")
    if device == "cpu":
        return "float32"
    if spec.model_engine == "sentence_transformers":
        return "float32"
    if requested == "auto" and stored in DTYPE_BYTES:
        return stored
    return "bfloat16"


def _context(spec: ModelSpec, arch: Architecture, has_cls: bool) -> tuple[Optional[int], int, list[str]]:
    """(n_ctx, tokens of KV cache allocated, notes) as the engine will set them up."""
    trained = arch.trained_ctx
    notes: list[str] = []
    engine = spec.model_engine
    if engine == "llama.cpp":
        default = LLAMA_CHAT_CTX if spec.model_type == ModelType.LLM else LLAMA_EMBED_CTX
        n_ctx = spec.n_ctx or min(trained or default, default)
        tokens = n_ctx
        if spec.model_type == ModelType.RERANK:
            mode = spec.options.get("rerank_mode") or ("rank" if has_cls else "yes_no")
            if mode == "yes_no":
                parallel = llama_rerank_slots(spec.n_parallel, spec.options)  # 1 in rerank_batching=exact
                tokens = n_ctx * parallel
                notes.append(f"yes/no reranking keeps {parallel} slots of n_ctx {n_ctx}")
        return n_ctx, tokens, notes
    if engine == "vllm":
        n_ctx = spec.n_ctx or spec.options.get("max_model_len") or trained or TORCH_MAX_LENGTH
        notes.append("vLLM also pre-allocates gpu_memory_utilization (default 0.9) of the GPU for its KV cache")
        return int(n_ctx), int(n_ctx), notes
    n_ctx = spec.n_ctx or min(trained or TORCH_MAX_LENGTH, TORCH_MAX_LENGTH)
    return int(n_ctx), int(n_ctx), notes


def estimate(spec: ModelSpec) -> MemoryEstimate:
    """How much memory `spec` will take once loaded, from its files and settings."""
    path = Path(spec.model_path)
    device = _device_for(spec)
    engine = spec.model_engine
    notes: list[str] = []
    arch = Architecture()
    has_cls = False
    params: Optional[float] = None
    quant = (spec.quantization or "").strip()
    is_gguf = spec.model_format == "gguf" or path.suffix.lower() == ".gguf"

    if is_gguf and path.is_file():
        arch, file_quant, params, has_cls = _gguf_facts(path)
        weights = sum(p.stat().st_size for p in _gguf_shards(path))
        dtype = file_quant or quant.upper() or "gguf"
        source = "GGUF file size"
    else:
        folder = path if path.is_dir() else path.parent
        config = _read_json(folder / "config.json")
        arch = _config_arch(config) if config else Architecture()
        stored_params, stored_dtype, disk = _safetensors_params(folder) if folder.is_dir() else (None, None, 0)
        stored_dtype = stored_dtype or config.get("torch_dtype")
        if quant.upper() in GGUF_BPW:
            dtype, bytes_per = quant.upper(), GGUF_BPW[quant.upper()] / 8
        elif quant.lower() in PACKED_QUANT_BPW:
            dtype, bytes_per = quant, PACKED_QUANT_BPW[quant.lower()] / 8
        elif engine == "vllm" and not spec.options.get("dtype") and stored_dtype in DTYPE_BYTES:
            dtype = "bfloat16" if stored_dtype == "float32" else stored_dtype
            bytes_per = DTYPE_BYTES[dtype]
        else:
            dtype = _torch_load_dtype(spec, device, stored_dtype)
            bytes_per = DTYPE_BYTES.get(dtype, 2)
        known = None if config else _known_model(f"{spec.model_path} {spec.model_name}")
        if known:  # no files yet (a plan before pulling): a model whose architecture is published
            arch = known[1]
        if stored_params:
            params, source = stored_params, "safetensors headers"
        elif params_from_config(arch):
            params, source = params_from_config(arch), "config.json"
        elif known:
            params, source = known[0], f"published size of {known[2]}"
        elif spec.size_in_billions:
            params, source = float(spec.size_in_billions), "size_in_billions"
        else:
            disk = disk or sum(p.stat().st_size for p in folder.glob("*.bin")) if folder.is_dir() else 0
            params, source = None, "file sizes"
        weights = int(params * 1e9 * bytes_per) if params else int(disk)
        if not weights:
            notes.append("no weights, config.json or size_in_billions to estimate from; pass --size-in-billions")

    n_ctx, kv_tokens, ctx_notes = _context(spec, arch, has_cls)
    notes += ctx_notes
    per_token = arch.kv_bytes_per_token if arch.decoder else None
    kv = 0
    if per_token and (spec.model_type == ModelType.LLM or engine in ("llama.cpp", "vllm")):
        kv = per_token * kv_tokens
    else:
        kv_tokens = 0
    if kv_tokens == 0 and arch.hidden and n_ctx:
        # Encoders and torch embedding/rerank passes keep no cache; the peak is one batch's activations.
        act_bytes = 2 if device == "gpu" else 4
        kv = int(n_ctx * (arch.hidden * 8 + (arch.intermediate or 4 * arch.hidden) * 3) * act_bytes)
    overhead = _runtime_overhead(engine, device, weights)
    return MemoryEstimate(uid=spec.uid, device=device, weights_bytes=int(weights), kv_cache_bytes=int(kv),
                          overhead_bytes=overhead, params_billions=round(params, 3) if params else None,
                          weights_dtype=dtype, weights_source=source, n_ctx=n_ctx, kv_tokens=kv_tokens,
                          engine=engine, arch=arch, notes=notes)


def _known_model(text: str) -> Optional[tuple[float, Architecture, str]]:
    """(parameters in billions, architecture, name) for a Qwen3 model named in `text`."""
    for family in (Family.EMBEDDING, Family.RERANKER, Family.CHAT):  # the longer names first
        for label, params, layers, hidden, intermediate in QWEN3_SIZES[family]:
            name = f"{SIZE_NAMES[family]}-{label}"
            if re.search(re.escape(name) + r"(?![\d.])", text, re.IGNORECASE):
                arch = Architecture(layers=layers, kv_heads=8, head_dim_k=128, head_dim_v=128, hidden=hidden,
                                    intermediate=intermediate, heads=hidden // 128, trained_ctx=40960, decoder=True,
                                    name=name)
                return params, arch, name
    return None


def _runtime_overhead(engine: str, device: str, weights: float) -> int:
    if device == "gpu":
        fixed = 300 * MiB if engine == "llama.cpp" else 800 * MiB  # CUDA context, cuBLAS workspace
        return int(fixed + 0.06 * weights)
    # The worker process itself: Python + HTTP (+ torch and transformers for the torch engines).
    fixed = 120 * MiB if engine == "llama.cpp" else 550 * MiB
    return int(fixed + 0.05 * weights)


# ---- what is free ------------------------------------------------------------------------------

@dataclass
class MemoryFigures:
    device: str  # "gpu" or "cpu"
    name: str  # "GPU 0 (NVIDIA ...)" or "RAM"
    total_bytes: int
    free_bytes: int  # as the driver / kernel reports it now
    reserved_bytes: int = 0  # what ragserve workers already launched have still to take (or hold, under a limit)
    reserved_by: list[tuple[str, int]] = field(default_factory=list)
    source: str = ""
    limit_bytes: Optional[int] = None

    @property
    def budget_bytes(self) -> int:
        budget = self.free_bytes - self.reserved_bytes
        if self.limit_bytes is not None:
            held = sum(b for _, b in self.reserved_by)
            budget = min(budget, self.limit_bytes - held)
        return max(0, int(budget))

    def describe(self) -> str:
        text = f"{self.name}: {gib(self.total_bytes)} total, {gib(self.free_bytes)} free ({self.source})"
        if self.limit_bytes is not None:
            text += f", capped at {gib(self.limit_bytes)} by {LIMIT_ENV}"
        if self.reserved_by:
            text += ", held by this server's models: " + ", ".join(f"{uid} {gib(b)}" for uid, b in self.reserved_by)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "name": self.name, "total_bytes": self.total_bytes,
                "free_bytes": self.free_bytes, "reserved_bytes": self.reserved_bytes,
                "reserved_by": [list(x) for x in self.reserved_by], "limit_bytes": self.limit_bytes,
                "budget_bytes": self.budget_bytes, "source": self.source}


def _visible_gpu_index() -> Optional[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    first = visible.split(",")[0].strip()
    return first or "-1"


def gpus() -> list[dict[str, Any]]:
    """The GPUs nvidia-smi reports: index, name, total, free (bytes). Empty without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        try:
            found.append({"index": parts[0], "uuid": parts[1], "name": parts[2], "total": int(parts[3]) * MiB,
                          "free": int(parts[4]) * MiB})
        except ValueError:
            continue
    return found


def _gpu_process_usage() -> dict[int, int]:
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    usage: dict[int, int] = {}
    for line in out.stdout.strip().splitlines():
        try:
            pid, used = (int(p.strip()) for p in line.split(","))
        except ValueError:
            continue
        usage[pid] = usage.get(pid, 0) + used * MiB
    return usage


def _gpu_figures() -> Optional[MemoryFigures]:
    found = gpus()
    if found:
        wanted = _visible_gpu_index()
        chosen = found[0]
        if wanted is not None:
            chosen = next((g for g in found if wanted in (g["index"], g["uuid"])), None)
            if chosen is None:
                return None
        return MemoryFigures("gpu", f"GPU {chosen['index']} ({chosen['name']})", chosen["total"], chosen["free"],
                             source="nvidia-smi")
    if not Path("/proc/driver/nvidia/gpus").exists():
        return None  # no driver: do not pay for importing torch
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        return MemoryFigures("gpu", f"GPU 0 ({torch.cuda.get_device_name(0)})", int(total), int(free),
                             source="torch.cuda.mem_get_info")
    except (ImportError, RuntimeError) as exc:
        # A driver but neither nvidia-smi nor a working torch.cuda: RAM is the measure, and check_fits says so.
        log.warning("memory check: a GPU driver is present but its memory cannot be read (%s)", exc)
        return None


def running_workers() -> list[tuple[ModelSpec, int, int, Optional[int]]]:
    """(spec, pid, RAM it holds now, parent pid) of every ragserve model worker on this machine."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "ragserve.workers.worker" not in cmd or "--spec-file" not in cmd:
            continue
        try:
            spec_file = cmd[cmd.index("--spec-file") + 1]
            spec = ModelSpec.from_dict(json.loads(Path(spec_file).read_text()))
            mem = proc.memory_info()
            # Pages mapped from the model file (llama.cpp mmap) still count as "available" to the
            # kernel, so only the anonymous part has already left the free figure.
            held = max(0, mem.rss - getattr(mem, "shared", 0))
        except (IndexError, OSError, ValueError, KeyError, TypeError, psutil.Error):
            continue
        found.append((spec, proc.info["pid"], held, proc.info.get("ppid")))
    return found


def memory_limit_bytes() -> Optional[int]:
    raw = os.environ.get(LIMIT_ENV)
    if not raw:
        return None
    try:
        return int(float(raw) * GiB)
    except ValueError:
        raise EstimateError(f"{LIMIT_ENV}={raw!r} is not a number of GiB: set it to e.g. 20 (or unset it) and "
                            f"restart the server") from None


def available(device: Optional[str] = None, *, server_pid: Optional[int] = None,
              exclude_uids: Iterable[str] = ()) -> MemoryFigures:
    """Free memory on `device` ("gpu"/"cpu"; default: the GPU when one is visible, else RAM),
    less what launched ragserve workers are still to take.

    Every ragserve worker on the machine shares the physical memory, so all of them count
    against the free figure. Under RAGSERVE_MEMORY_LIMIT_GB (one server's share) only the
    workers of `server_pid` (default: this process, i.e. the gateway) count against the cap.
    """
    import psutil

    figures = _gpu_figures() if device in (None, "gpu") else None
    if figures is None:
        vm = psutil.virtual_memory()
        figures = MemoryFigures("cpu", "RAM", int(vm.total), int(vm.available), source="psutil")
    figures.limit_bytes = memory_limit_bytes()
    owner = server_pid or os.getpid()
    gpu_usage = _gpu_process_usage() if figures.device == "gpu" else {}
    excluded = set(exclude_uids)
    for spec, pid, ram_held, parent in running_workers():
        try:
            est = estimate(spec)
        except (OSError, EstimateError) as exc:
            # Its files moved or changed since it loaded: what it still has to take is unknown, so only
            # what it already holds (already out of the free figure) counts; the log says so.
            log.warning("memory check: cannot estimate running model %s (%s); counting only what it holds now",
                        spec.uid, exc)
            continue
        if est.device != figures.device:
            continue
        held = gpu_usage.get(pid, 0) if figures.device == "gpu" else ram_held
        figures.reserved_bytes += max(0, est.total_bytes - held)
        if parent == owner and spec.uid not in excluded:
            figures.reserved_by.append((spec.uid, est.total_bytes))
    return figures


# ---- the check ---------------------------------------------------------------------------------

def _family_sizes(spec: ModelSpec, est: MemoryEstimate) -> tuple[Optional[str], list[tuple]]:
    family = family_from_name(f"{Path(spec.model_path).name} {est.arch.name} {spec.model_name}")
    if family not in QWEN3_SIZES:
        return None, []
    return SIZE_NAMES[family], QWEN3_SIZES[family]


def suggest(spec: ModelSpec, est: MemoryEstimate, budget: int) -> list[str]:
    """What would fit in `budget`: a smaller quantization, a smaller size, a shorter context."""
    ideas: list[str] = []
    params = est.params_billions
    rest = est.kv_cache_bytes
    current_bpw = est.weights_bytes * 8 / (params * 1e9) if params else None

    def need(weights: float, kv: float) -> int:
        return int(weights + kv + _runtime_overhead("llama.cpp", est.device, weights))

    if params:
        fitting = []
        for quant in SUGGESTED_QUANTS:
            bpw = GGUF_BPW[quant]
            if current_bpw and bpw >= current_bpw - 0.1:
                continue
            total = need(params * 1e9 * bpw / 8, rest)
            if total <= budget:
                fitting.append(f"{quant} (~{gib(total)})")
        if fitting:
            where = ("another quantization of this GGUF" if est.weights_source == "GGUF file size"
                     else "a GGUF build of this model (engine llama.cpp; hub repos named <model>-GGUF)")
            ideas.append(f"{where}: {', '.join(fitting)}; Q4_K_M and Q5_K_M keep nearly all the quality")
    family, sizes = _family_sizes(spec, est)
    if family and params:
        bytes_per = (current_bpw or 16) / 8
        smaller = []
        for label, size_params, layers, _hidden, _intermediate in sizes:
            if size_params >= params * 0.95:
                continue
            kv = 0
            if est.kv_tokens and est.arch.kv_bytes_per_token:
                kv = layers * 8 * 256 * 2 * est.kv_tokens
            weights = size_params * 1e9 * bytes_per
            total = int(weights + kv + _runtime_overhead(est.engine, est.device, weights))
            q4 = need(size_params * 1e9 * GGUF_BPW["Q4_K_M"] / 8, kv)
            if total <= budget:
                smaller.append(f"{family}-{label} at {est.weights_dtype} (~{gib(total)})")
            elif q4 <= budget and not smaller:
                smaller.append(f"{family}-{label} as a Q4_K_M GGUF (~{gib(q4)})")
        if smaller:
            ideas.append("a smaller size: " + " or ".join(smaller[:2]))
    elif params and est.weights_bytes:
        bytes_per = est.weights_bytes / (params * 1e9)
        room = budget - rest - _runtime_overhead(est.engine, est.device, 0)
        if room > 0:
            max_b = room / (bytes_per * 1e9 * 1.06)
            if max_b >= 0.1:
                ideas.append(f"a smaller model: at most ~{max_b:.1f} B parameters at {est.weights_dtype}")
    per_token = est.arch.kv_bytes_per_token
    if est.kv_cache_bytes and est.kv_tokens and per_token and est.n_ctx:
        fixed = est.weights_bytes + est.overhead_bytes
        if fixed < budget:
            factor = est.kv_tokens / est.n_ctx
            max_ctx = int((budget - fixed) / (per_token * factor))
            max_ctx = (max_ctx // 1024) * 1024 if max_ctx >= 2048 else (max_ctx // 256) * 256
            if 256 <= max_ctx < est.n_ctx:
                ideas.append(f"a shorter context: n_ctx {max_ctx} (now {est.n_ctx}; KV cache "
                             f"{gib(est.kv_cache_bytes)})")
    if est.device == "gpu" and est.engine == "vllm":
        ideas.append("for vLLM, also lower options.gpu_memory_utilization to leave room for the other models")
    return ideas


def _estimate_or_explain(spec: ModelSpec) -> MemoryEstimate:
    try:
        return estimate(spec)
    except (OSError, EstimateError) as exc:
        raise EstimateError(f"no memory estimate for {spec.uid!r}: {exc}. Fix the files, or launch with force=true "
                            f"(--force) to skip the memory check") from exc


def check_fits(spec: ModelSpec, *, also: Iterable[ModelSpec] = (), figures: Optional[MemoryFigures] = None,
               server_pid: Optional[int] = None) -> Optional[MemoryEstimate]:
    """Return the estimate if `spec` fits, else raise InsufficientMemory with figures and suggestions.

    `also`: models about to be launched before this one (a stack), counted as reserved.
    `figures`: the free memory to plan against (default: measured now with `available`).
    `server_pid`: the gateway whose models count against RAGSERVE_MEMORY_LIMIT_GB (default: this process).
    Files that cannot be read well enough to estimate raise EstimateError (naming the file
    and the fix; launching with force skips the check), never a silent launch without it.
    """
    est = _estimate_or_explain(spec)
    figures = figures or available(est.device, server_pid=server_pid)
    budget = figures.budget_bytes
    planned = 0
    planned_by = []
    for other in also:
        other_est = _estimate_or_explain(other)
        if other_est.device == est.device:
            planned += other_est.total_bytes
            planned_by.append(f"{other.uid} {gib(other_est.total_bytes)}")
    budget = max(0, budget - planned)
    needed = est.total_bytes
    if est.engine == "vllm" and est.device == "gpu" and figures.device == "gpu":
        util = float(spec.options.get("gpu_memory_utilization", 0.9))
        needed = max(needed, int(util * figures.total_bytes))
    if needed <= budget:
        return est
    ideas = suggest(spec, est, budget)
    where = figures.describe()
    if planned_by:
        where += "; planned before it in this stack: " + ", ".join(planned_by)
    if est.device == "gpu" and figures.device != "gpu":
        where += "; no GPU is visible here, so RAM was the measure"
    message = (f"not enough memory for {spec.uid!r}: it needs about {gib(needed)} on the "
               f"{'GPU' if est.device == 'gpu' else 'CPU (RAM)'} ({est.breakdown()}), but only {gib(budget)} is "
               f"available [{where}].")
    if needed > est.total_bytes:
        message += (f" vLLM takes gpu_memory_utilization={spec.options.get('gpu_memory_utilization', 0.9)} of the "
                    f"GPU's {gib(figures.total_bytes)}.")
    if ideas:
        message += " What would fit: " + "; or ".join(ideas) + "."
    else:
        message += " Free memory (terminate other models) or use a machine with more memory."
    raise InsufficientMemory(message, est, figures, ideas)
