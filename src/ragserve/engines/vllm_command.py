"""The `vllm serve` argument list for a model spec: pure (reads the model's files, starts nothing).

The vLLM engine runs exactly `vllm <serve_command(spec, port=...)>`, and scripts/check-vllm.sh
feeds the same lists to the real vLLM's own parser, so a flag that vLLM rejects or ignores is
found without a GPU. The model's Hugging Face tokenizer (what vLLM tokenizes with) is loaded here too,
for the engine's counts and Qwen3-Embedding's closing token.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import qwen3
from ragserve.engines.base import EngineError
from ragserve.engines.qwen3 import Family

# vLLM's own quantization method names; a GGUF quant name in spec.quantization (Q4_K_M) is a
# file choice that resolve already made, not a flag for vLLM.
VLLM_QUANTIZATIONS = {"awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "bitsandbytes", "compressed-tensors",
                      "marlin", "squeezellm", "aqlm", "hqq", "experts_int8", "modelopt", "gguf", "mxfp4",
                      "torchao", "quark", "moe_wna16"}

# Qwen3-Reranker ships as a plain causal LM. These overrides make vLLM load it as a one-logit
# classifier built from the lm_head rows of "no" and "yes": its sigmoid is P(yes)/(P(yes)+P(no)),
# the model card's score (see vLLM's Qwen3-Reranker example).
QWEN3_RERANKER_HF_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}

def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vllm, from its package metadata (importing vllm pulls in torch).

    The metadata is also where the `vllm` command comes from, so without it vLLM cannot be started.
    """
    import importlib.metadata

    try:
        raw = importlib.metadata.version("vllm")
        scripts = importlib.metadata.entry_points(group="console_scripts", name="vllm")
    except importlib.metadata.PackageNotFoundError:
        raw, scripts = None, ()
    match = re.match(r"(\d+)\.(\d+)", raw or "")
    if not scripts or not match:
        raise EngineError(f"vLLM is not installed for {sys.executable} (no `vllm` command in the package metadata"
                          f"{', version ' + raw if raw else ''}): pip install 'ragserve[vllm]' on a CUDA machine")
    return int(match.group(1)), int(match.group(2))


def pooling_flag_style() -> str:
    """'runner' for vLLM >= 0.10 (`--runner pooling --convert X`), 'task' before (`--task X`).

    `--task` was replaced in 0.10 and later removed, so the wrong style fails at argument parsing.
    """
    return "runner" if vllm_version() >= (0, 10) else "task"


def model_family(spec: ModelSpec) -> Optional[Family]:
    """The Qwen3 rule this embedding or rerank spec needs (qwen3's one family vocabulary), or None."""
    try:
        family = qwen3.model_family(spec.model_path)
    except ValueError as exc:  # an unreadable config or GGUF header: its message names the file and the fix
        raise EngineError(str(exc)) from exc
    if spec.model_type == ModelType.EMBEDDING and family == Family.EMBEDDING:
        return family
    if spec.model_type == ModelType.RERANK and family in (Family.RERANKER, Family.RERANKER_SEQ_CLS):
        return family
    return None


def _architectures(spec: ModelSpec) -> list[str]:
    config = Path(spec.model_path) / "config.json"
    if not config.is_file():
        return []  # a GGUF file: vLLM reads its architecture from the header
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError) as exc:
        raise EngineError(f"{config} is not readable JSON ({exc}): the download is damaged; pull the model "
                          "again") from exc


def _pooling_args(spec: ModelSpec, style: str) -> list[str]:
    if spec.model_type == ModelType.LLM:
        return []
    if style == "task":
        return ["--task", "embed" if spec.model_type == ModelType.EMBEDDING else "score"]
    args = ["--runner", "pooling"]
    # A causal LM (Qwen3-Embedding) has no pooler of its own: say which one to build. Native
    # pooling models and *ForSequenceClassification are converted automatically.
    if spec.model_type == ModelType.EMBEDDING and any(a.endswith("ForCausalLM") for a in _architectures(spec)):
        args += ["--convert", "embed"]
    return args


def serve_args(spec: ModelSpec, *, port: int, style: str, family: Optional[str]) -> list[str]:
    """`vllm serve` arguments for `spec` (after the program name), for a given flag style and family."""
    opts = spec.options or {}
    args = ["serve", spec.model_path, "--served-model-name", spec.uid, "--host", "127.0.0.1", "--port", str(port)]
    n_ctx = spec.n_ctx or opts.get("max_model_len")
    if n_ctx:
        args += ["--max-model-len", str(int(n_ctx))]
    args += _pooling_args(spec, style)
    overrides = dict(QWEN3_RERANKER_HF_OVERRIDES) if family == Family.RERANKER else {}
    overrides.update(opts.get("hf_overrides") or {})
    if overrides:
        args += ["--hf-overrides", json.dumps(overrides)]
    for option, flag in (("gpu_memory_utilization", "--gpu-memory-utilization"),
                         ("tensor_parallel_size", "--tensor-parallel-size"),
                         ("dtype", "--dtype"), ("tokenizer", "--tokenizer"),
                         ("max_num_seqs", "--max-num-seqs"), ("chat_template", "--chat-template")):
        if opts.get(option) not in (None, ""):
            args += [flag, str(opts[option])]
    quantization = opts.get("quantization") or (
        spec.quantization if (spec.quantization or "").lower() in VLLM_QUANTIZATIONS else None)
    if quantization:
        args += ["--quantization", str(quantization)]
    if opts.get("trust_remote_code"):
        args.append("--trust-remote-code")
    if opts.get("enforce_eager"):
        args.append("--enforce-eager")
    extra = opts.get("extra_args") or opts.get("vllm_args") or []
    args += shlex.split(extra) if isinstance(extra, str) else [str(a) for a in extra]
    return args


def serve_command(spec: ModelSpec, *, port: int) -> list[str]:
    """Exactly the arguments the engine gives the `vllm` command for `spec`; starts nothing."""
    if spec.model_type == ModelType.LLM:
        return serve_args(spec, port=port, style="runner", family=None)  # the style only affects pooling
    return serve_args(spec, port=port, style=pooling_flag_style(), family=model_family(spec))


def hf_tokenizer(spec: ModelSpec, purpose: str):
    """The model's Hugging Face tokenizer, as vLLM loads it (options.tokenizer, else the model's folder;
    a GGUF file's own vocabulary)."""
    try:
        from transformers import AutoTokenizer

        source = spec.options.get("tokenizer") or spec.model_path
        extra: dict[str, Any] = {}
        if Path(source).is_file():  # a GGUF: transformers reads its vocabulary, as vLLM does
            source, extra["gguf_file"] = str(Path(source).parent), Path(source).name
        return AutoTokenizer.from_pretrained(source, local_files_only=True, **extra,
                                             trust_remote_code=bool(spec.options.get("trust_remote_code")))
    except Exception as exc:  # noqa: BLE001 - without the tokenizer the counts are unknown
        raise EngineError(f"the tokenizer of {spec.model_path} did not load ({type(exc).__name__}: {exc}), so "
                          f"ragserve cannot tell {purpose}: pull the model again (tokenizer.json, "
                          f"tokenizer_config.json) or set options.tokenizer to a folder holding them") from exc


def qwen3_eos_suffix(spec: ModelSpec) -> str:
    """'<|endoftext|>' where the folder's tokenizer does not close texts with it itself.

    Qwen3-Embedding pools the hidden state of a closing <|endoftext|>; newer tokenizer files append
    it, older ones leave it to the caller. vLLM tokenizes the special token's text to its id.
    """
    if Path(spec.model_path).is_file():
        return ""  # a GGUF: vLLM tokenizes with the GGUF's own settings
    tokenizer = hf_tokenizer(spec, "whether Qwen3-Embedding texts need a closing <|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if not isinstance(eos, int) or eos == tokenizer.unk_token_id:
        return ""
    probe = tokenizer("probe")["input_ids"]
    return "" if probe and probe[-1] == eos else "<|endoftext|>"
