"""From a launch request to a checked ModelSpec: find the files, the format and the engine.

Every mistake a user can make here (wrong path, format the engine cannot read, engine extra
missing, model type that does not fit the files) is reported before any worker starts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import ENGINES, canonical_engine_name, qwen3
from ragserve.engines.base import EngineError
from ragserve.workers.batching import check_batch_options


class LaunchError(Exception):
    """A launch request that cannot work as given; the message names the cause and the fix."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def find_gguf(path: Path, quantization: Optional[str]) -> Path:
    """A .gguf file, or the one in a folder that matches the quantization."""
    if path.is_file():
        return path
    files = sorted(p for p in path.rglob("*.gguf") if "mmproj" not in p.name.lower())
    if not files:
        raise LaunchError(f"no .gguf file in {path}")
    if quantization:
        wanted = quantization.lower().replace("-", "_")
        matching = [p for p in files if wanted in p.name.lower().replace("-", "_")]
        if len(matching) == 1:
            return matching[0]
        if not matching:
            raise LaunchError(f"no .gguf file in {path} matches quantization {quantization!r}; "
                              f"found: {', '.join(p.name for p in files)}")
        files = matching
    if len(files) > 1:
        shards = [p for p in files if re.search(r"-0*1-of-\d+\.gguf$", p.name)]
        if len(shards) == 1 and all(re.search(r"-\d+-of-\d+\.gguf$", p.name) for p in files):
            return shards[0]
        raise LaunchError(f"{path} holds several .gguf files ({', '.join(p.name for p in files)}): choose one with "
                          f"--quantization or point --model-path at the file")
    return files[0]


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise LaunchError(f"{path} is a file but not a .gguf file: point --model-path at a .gguf file or at a model "
                          f"folder (with config.json)")
    names = {p.name for p in path.iterdir()}
    if any(n.endswith(".gguf") for n in names) and "config.json" not in names:
        return "gguf"
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        return "pytorch"
    if any(n.endswith(".gguf") for n in names):
        return "gguf"
    raise LaunchError(f"{path} holds no model weights (.gguf, .safetensors or .bin): check --model-path; "
                      f"`ragserve pull` puts downloaded models under the home's models/ folder")


def folder_kind(path: Path) -> dict[str, Any]:
    """What a Hugging Face folder is: sentence-transformers, cross-encoder, causal LM, Qwen3 family..."""
    config = _read_json(path / "config.json")
    architectures = config.get("architectures") or []
    kind: dict[str, Any] = {
        "model_type": config.get("model_type"),
        "architectures": architectures,
        "sentence_transformers": (path / "modules.json").exists(),
        "sequence_classification": any(a.endswith("ForSequenceClassification") for a in architectures),
        "causal_lm": any(a.endswith("ForCausalLM") or a.endswith("ForConditionalGeneration") for a in architectures),
        "suggested_type": None,
        "family": None,
    }
    try:  # Qwen3 embedding / reranker / chat rules: one family vocabulary (ragserve.engines.qwen3.Family)
        detected = qwen3.detect_hf_folder(path)
    except ValueError as exc:  # a damaged config or sentence-transformers file, named in the message
        raise LaunchError(str(exc)) from exc
    kind.update({k: v for k, v in detected.items() if v is not None})
    if kind["suggested_type"] is None:
        if kind["sequence_classification"]:  # cross-encoders may also carry modules.json
            kind["suggested_type"] = ModelType.RERANK
        elif kind["sentence_transformers"]:
            kind["suggested_type"] = ModelType.EMBEDDING
        elif kind["causal_lm"]:
            kind["suggested_type"] = ModelType.LLM
    elif isinstance(kind["suggested_type"], str):
        kind["suggested_type"] = ModelType.parse(kind["suggested_type"])
    return kind


def _check_type_fits_folder(model_type: ModelType, kind: dict[str, Any], path: Path) -> None:
    suggested = kind.get("suggested_type")
    if suggested is None or suggested == model_type:
        return
    # A causal LM can legitimately serve as an embedder or a yes/no reranker only when its family says so.
    what = {ModelType.LLM: "a chat/completion model", ModelType.EMBEDDING: "an embedding model",
            ModelType.RERANK: "a rerank model"}[suggested]
    raise LaunchError(f"{path} looks like {what} (config: {', '.join(kind['architectures']) or kind['model_type']}"
                      f"{', sentence-transformers' if kind['sentence_transformers'] else ''}), not {model_type.value}: "
                      f"launch it with --model-type {suggested.value}")


def choose_engine(model_type: ModelType, model_format: str, kind: dict[str, Any]) -> str:
    if model_format == "gguf":
        return "llama.cpp"
    if kind.get("family") in _TORCH_RULE_FAMILIES:
        return "transformers"  # their pooling / yes-no rules live in the transformers engine
    if model_type in (ModelType.EMBEDDING, ModelType.RERANK) and (kind["sentence_transformers"]
                                                                   or kind["sequence_classification"]):
        return "sentence_transformers"
    if model_type == ModelType.LLM and ENGINES["vllm"].missing_packages() == [] and _cuda_visible():
        return "vllm"
    return "transformers"


# Families whose rules (query-only instruction, MRL `dimensions`, yes/no judging prompt) the
# sentence-transformers engine does not apply: launching them there would serve wrong results.
_TORCH_RULE_FAMILIES = (qwen3.Family.EMBEDDING, qwen3.Family.RERANKER)


def _check_engine_fits_family(engine: str, kind: dict[str, Any], path: Path) -> None:
    family = kind.get("family")
    if engine == "sentence_transformers" and family in _TORCH_RULE_FAMILIES:
        raise LaunchError(f"{path} is a {family.value} model ({kind.get('reason')}); the sentence_transformers engine "
                          f"does not apply its rules ({qwen3.rule_text(family)}): use --model-engine transformers "
                          f"(or vllm), or leave --model-engine out")


def _cuda_visible() -> bool:
    return shutil.which("nvidia-smi") is not None


def build_spec(*, uid: Optional[str], model_name: str, model_type: str, model_engine: Optional[str],
               model_path: Optional[str], model_format: Optional[str] = None, quantization: Optional[str] = None,
               size_in_billions: Optional[float] = None, n_ctx: Optional[int] = None,
               n_parallel: Optional[int] = None, options: Optional[dict[str, Any]] = None) -> ModelSpec:
    try:
        mtype = ModelType.parse(model_type)
        check_batch_options(options or {})
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    if not model_path:
        raise LaunchError(f"no model path for {model_name!r}: pass --model-path with a local folder or .gguf file, "
                          f"or a hub ID such as Qwen/Qwen3-Embedding-4B (ragserve pulls it first)")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise LaunchError(f"model path {path} does not exist: check the path (it is read on the server's machine); "
                          f"for a hub model run `ragserve pull ORG/NAME` first or pass the hub ID")
    path = path.resolve()
    from ragserve.hub.store import launch_problem  # a pulled model whose files changed size since the pull:
    if problem := launch_problem(path):            # say which and how to fix, not a load failure in the worker
        raise LaunchError(problem)
    fmt = detect_format(path)
    if model_format and model_format.lower() not in (fmt, "ggufv2", "ggmlv3") and not (
            model_format.lower() == "pytorch" and fmt == "safetensors"):
        raise LaunchError(f"--model-format {model_format} does not match the files in {path}, which are {fmt}: "
                          f"drop --model-format or fix the path")
    kind = folder_kind(path) if path.is_dir() and fmt != "gguf" else {"sentence_transformers": False,
                                                                       "sequence_classification": False}
    if fmt != "gguf":
        _check_type_fits_folder(mtype, kind, path)
    try:
        engine = canonical_engine_name(model_engine) if model_engine else choose_engine(mtype, fmt, kind)
    except EngineError as exc:
        raise LaunchError(str(exc)) from exc
    _check_engine_fits_family(engine, kind, path)
    info = ENGINES[engine]
    if fmt not in info.formats:
        if fmt == "gguf":
            fix = "use --model-engine llama.cpp for a .gguf file"
        else:
            fix = "point --model-path at a .gguf file, or use --model-engine transformers for this folder"
        raise LaunchError(f"engine {engine} cannot load {fmt} files ({path}): {fix}")
    if mtype not in info.model_types:
        raise LaunchError(f"engine {engine} does not serve {mtype.value} models: use one of "
                          f"{', '.join(n for n, e in ENGINES.items() if mtype in e.model_types)}")
    missing = info.missing_packages()
    if missing:
        raise LaunchError(f"engine {engine} needs {', '.join(missing)}, which is not installed in the server's "
                          f"environment: run {info.install_hint()} and restart `ragserve serve`")
    resolved = find_gguf(path, quantization) if fmt == "gguf" else path
    return ModelSpec(
        uid=uid or model_name, model_name=model_name, model_type=mtype, model_engine=engine,
        model_path=str(resolved), model_format=fmt, quantization=quantization, size_in_billions=size_in_billions,
        n_ctx=n_ctx, n_parallel=n_parallel, options=dict(options or {}),
    )
