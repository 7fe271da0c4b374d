"""Qwen3 embedding and reranker recipes, as their model cards define them.

Shared by every engine that serves these models (transformers, llama.cpp), so the
prompt text is written once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DEFAULT_EMBEDDING_TASK = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def embedding_query_text(query: str, task: str | None = None) -> str:
    """Queries carry the task instruction; documents are embedded as they are."""
    return f"Instruct: {task or DEFAULT_EMBEDDING_TASK}\nQuery:{query}"


def rerank_pair_text(query: str, document: str, instruction: str | None = None) -> str:
    return f"<Instruct>: {instruction or DEFAULT_RERANK_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


def rerank_prompt(query: str, document: str, instruction: str | None = None) -> str:
    """The full judging prompt; the score is P(yes) / (P(yes) + P(no)) at its last position."""
    return RERANK_PREFIX + rerank_pair_text(query, document, instruction) + RERANK_SUFFIX


# --- Recognising Qwen3 models ---------------------------------------------------------------
#
# Launch must pick the right recipe without flags: a Qwen3 folder is a chat model unless its
# name or files mark it as the embedding or reranker variant (all three share the
# Qwen3ForCausalLM architecture, so config.json alone cannot tell them apart).

QWEN3_MODEL_TYPES = {"qwen3", "qwen3_moe"}
_HASH_NAME = re.compile(r"^[0-9a-f]{16,64}$")  # hub cache snapshot folders


def _name_parts(folder: Path) -> list[str]:
    """The folder name, plus the repo folder above a hub-cache snapshot (models--Org--Name/snapshots/<sha>)."""
    parts = [folder.name]
    if _HASH_NAME.match(folder.name) and folder.parent.name == "snapshots":
        parts.append(folder.parent.parent.name)
    return [p.lower() for p in parts]


def detect_hf_folder(path: str | Path) -> dict:
    """Tell family and model type of a Hugging Face folder from config.json, file markers and name.

    Returns {"family": "qwen3" | None, "suggested_type": "LLM" | "embedding" | "rerank" | None,
    "rule": "chat" | "last_token" | "yes_no" | "classifier" | None, "reason": str}.
    Only Qwen3 folders get an answer; for others every value but "reason" is None, so the
    caller's generic rules (sentence-transformers files, architectures) decide.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    result = {"family": None, "suggested_type": None, "rule": None, "reason": ""}
    if not config_file.is_file():
        result["reason"] = f"no config.json in {folder}"
        return result
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        result["reason"] = f"config.json in {folder} is not readable JSON: {exc}"
        return result
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    names = _name_parts(folder)
    st_files = [f for f in ("modules.json", "config_sentence_transformers.json") if (folder / f).is_file()]

    if model_type not in QWEN3_MODEL_TYPES:
        result["reason"] = f"config.json model_type is {model_type or 'missing'!r}, not Qwen3"
        return result

    result["family"] = "qwen3"
    if any("rerank" in n for n in names):
        result.update(suggested_type="rerank", rule="yes_no", reason=f"Qwen3 folder named {folder.name!r}")
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        result.update(suggested_type="rerank", rule="classifier", reason=f"config.json architecture {architectures[0]}")
    elif any("embed" in n for n in names):
        result.update(suggested_type="embedding", rule="last_token", reason=f"Qwen3 folder named {folder.name!r}")
    elif st_files or "Qwen3Model" in architectures:
        marker = st_files[0] if st_files else "architecture Qwen3Model"
        result.update(suggested_type="embedding", rule="last_token", reason=f"Qwen3 folder with {marker}")
    else:
        result.update(suggested_type="LLM", rule="chat", reason="Qwen3 causal LM without embedding or reranker markers")
    return result


def model_type_mismatch(path: str | Path, requested: str) -> str | None:
    """A user-facing error when `requested` contradicts what a Qwen3 folder is; None when it fits.

    Only Qwen3 folders are judged: for other families the folder gives no reliable answer.
    """
    detected = detect_hf_folder(path)
    if detected["family"] != "qwen3" or detected["suggested_type"] is None:
        return None
    wanted = requested.strip().lower()
    wanted = {"chat": "llm", "embed": "embedding", "embeddings": "embedding", "reranker": "rerank"}.get(wanted, wanted)
    if wanted == detected["suggested_type"].lower():
        return None
    return (f"{path} is a Qwen3 {detected['suggested_type']} model ({detected['reason']}), but it was launched "
            f"as model type {requested!r}: launch it with --model-type {detected['suggested_type']}, "
            f"or leave --model-type out to use the detected type")


# --- Qwen3 rerankers as GGUF -----------------------------------------------------------------
#
# Conversions come in two kinds: llama.cpp's converter (recent versions) writes a classifier
# head `cls.output` holding the lm_head rows of "yes" and "no" and pooling_type RANK, so
# llama.cpp's rank pooling returns softmax([yes, no]) directly; older or third-party
# conversions are plain causal LMs, scored by reading the "yes"/"no" logits at the last
# position of the judging prompt.

GGUF_POOLING_LAST = 3
GGUF_POOLING_RANK = 4  # llama_pooling_type: NONE 0, MEAN 1, CLS 2, LAST 3, RANK 4


def gguf_info(path: str | Path) -> dict:
    """Architecture, name, pooling type, classifier head and labels of a GGUF file (header only)."""
    from ragserve.engines.gguf_meta import read_gguf_header

    fields, tensors = read_gguf_header(path)
    arch = fields.get("general.architecture") or ""
    labels_key = f"{arch}.classifier.output_labels"
    if labels_key in fields or any(name.startswith("cls.") for name in tensors):
        # Arrays are skipped unless named, and the key embeds the architecture: read again for it.
        fields, tensors = read_gguf_header(path, keep_arrays=(labels_key,))
    return {
        "architecture": arch,
        "name": fields.get("general.name"),
        "pooling_type": fields.get(f"{arch}.pooling_type"),
        "classifier_labels": fields.get(f"{arch}.classifier.output_labels"),
        "has_classifier_head": any(name.split(".")[0] == "cls" for name in tensors),
    }


def gguf_rerank_mode(path: str | Path) -> str:
    """'rank' for a GGUF with a classifier head (or pooling_type RANK), 'yes_no' for a plain causal LM."""
    info = gguf_info(path)
    if info["has_classifier_head"] or info["pooling_type"] == GGUF_POOLING_RANK:
        return "rank"
    return "yes_no"


def gguf_yes_no_token_ids(path: str | Path) -> tuple[int, int]:
    """Ids of the single tokens "yes" and "no" in a GGUF vocabulary, for the yes/no rule."""
    from ragserve.engines.gguf_meta import read_gguf_header

    fields, _ = read_gguf_header(path, keep_arrays=("tokenizer.ggml.tokens",))
    ids: dict[str, int] = {}
    for index, token in enumerate(fields.get("tokenizer.ggml.tokens") or []):
        if token in ("yes", "no") and token not in ids:
            ids[token] = index
            if len(ids) == 2:
                break
    missing = [t for t in ("yes", "no") if t not in ids]
    if missing:
        raise ValueError(f"{path} has no single-token {' / '.join(repr(m) for m in missing)} in its vocabulary, "
                         "so the Qwen3 yes/no rerank rule cannot score it")
    return ids["yes"], ids["no"]


def gguf_family(metadata: dict) -> str | None:
    """'qwen3-embedding' | 'qwen3-reranker' | 'qwen3' | None from GGUF facts.

    `metadata` holds "architecture", "name", "pooling_type" and "has_classifier" (or
    "has_classifier_head"), as llama_cpp's header reader or gguf_info gives them. A reranker
    is known by its head or rank pooling even when the name says nothing; an embedding model
    by last-token pooling or its name.
    """
    arch = str(metadata.get("architecture") or "").lower()
    if not arch.startswith("qwen3"):
        return None
    name = str(metadata.get("name") or "").lower()
    pooling = metadata.get("pooling_type")
    has_head = metadata.get("has_classifier", metadata.get("has_classifier_head"))
    if has_head or pooling == GGUF_POOLING_RANK or "rerank" in name:
        return "qwen3-reranker"
    if pooling == GGUF_POOLING_LAST or "embed" in name:
        return "qwen3-embedding"
    return "qwen3"


def gguf_rerank_template(instruction: str | None = None) -> str:
    """The named "rerank" chat template llama.cpp's converter stores ({query}/{document} placeholders)."""
    return rerank_prompt("{query}", "{document}", instruction)
