"""Qwen3 embedding and reranker recipes, as their model cards define them.

Shared by every engine that serves these models (transformers, llama.cpp), so the
prompt text is written once.
"""

from __future__ import annotations

import json
import re
from enum import Enum
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


def embedding_inputs(texts, *, is_query: bool, instruction: str | None, default_task: str | None) -> list[str]:
    """The texts Qwen3-Embedding embeds: queries carry the instruction, documents go as they are.

    An instruction sent with documents is refused rather than applied (the model was trained
    without one on documents) or dropped (a request field must not be silently ignored).
    """
    from ragserve.engines.base import EngineInputError

    if not is_query:
        if instruction:
            raise EngineInputError("Qwen3-Embedding puts the instruction in front of queries only: send "
                                   "input_type \"query\" with it, or leave `instruction` out for documents")
        return list(texts)
    return [embedding_query_text(t, instruction or default_task) for t in texts]


def rerank_pair_text(query: str, document: str, instruction: str | None = None) -> str:
    return f"<Instruct>: {instruction or DEFAULT_RERANK_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


def rerank_prompt(query: str, document: str, instruction: str | None = None) -> str:
    """The full judging prompt; the score is P(yes) / (P(yes) + P(no)) at its last position."""
    return RERANK_PREFIX + rerank_pair_text(query, document, instruction) + RERANK_SUFFIX


# --- Recognising Qwen3 models: one family vocabulary for every detector -----------------------
#
# All three Qwen3 variants share the Qwen3ForCausalLM architecture, so config.json alone cannot
# tell them apart: the sentence-transformers files the official repos ship (modules.json with a
# last-token Pooling or a LogitScore module), the name (folder, hub-cache repo, GGUF
# general.name/basename) and the GGUF pooling / classifier head decide. Every engine (and the
# launch resolver) asks these functions, so a Qwen3-Embedding or Qwen3-Reranker gets its rules
# whichever engine serves it.


class Family(str, Enum):
    CHAT = "qwen3"
    EMBEDDING = "qwen3-embedding"
    RERANKER = "qwen3-reranker"  # causal LM scored with the yes/no judging prompt
    RERANKER_SEQ_CLS = "qwen3-reranker-seq-cls"  # converted to a classifier head (needs the same prompt)


# What each family's rule does, as `ragserve list` and GET /v1/models/{uid} show it (info.rule).
RULES: dict[Family, str] = {
    Family.CHAT: "qwen3: chat template, <think> reasoning returned as reasoning_content",
    Family.EMBEDDING: "qwen3-embedding: last-token pooling, L2 norm, query instruction (documents none), "
                      "MRL dimensions",
    Family.RERANKER: "qwen3-reranker: yes/no judging prompt, score P(yes)/(P(yes)+P(no))",
    Family.RERANKER_SEQ_CLS: "qwen3-reranker-seq-cls: judging prompt, classifier head",
}
_SUGGESTED_TYPE = {Family.CHAT: "LLM", Family.EMBEDDING: "embedding", Family.RERANKER: "rerank",
                   Family.RERANKER_SEQ_CLS: "rerank"}
_RULE_KIND = {Family.CHAT: "chat", Family.EMBEDDING: "last_token", Family.RERANKER: "yes_no",
              Family.RERANKER_SEQ_CLS: "classifier"}

QWEN3_MODEL_TYPES = {"qwen3", "qwen3_moe"}
_HASH_NAME = re.compile(r"^[0-9a-f]{16,64}$")  # hub cache snapshot folders


def _variant_from_name(text: str) -> Family:
    """Which Qwen3 variant a name says, for a model already known to be Qwen3."""
    lowered = str(text or "").lower()
    if "rerank" in lowered:
        return Family.RERANKER
    if "embed" in lowered:
        return Family.EMBEDDING
    return Family.CHAT


def family_from_name(text: str) -> Family | None:
    """The family a model name says (hub ID, folder, GGUF general.name): None when it is not Qwen3."""
    squashed = re.sub(r"[\s_-]", "", str(text or "").lower())
    return _variant_from_name(text) if "qwen3" in squashed else None


def _name_parts(folder: Path, config: dict) -> list[str]:
    """The folder name, the repo folder above a hub-cache snapshot (models--Org--Name/snapshots/<sha>),
    and config.json's _name_or_path."""
    parts = [folder.name]
    if _HASH_NAME.match(folder.name) and folder.parent.name == "snapshots":
        parts.append(folder.parent.parent.name)
    if config.get("_name_or_path"):
        parts.append(str(config["_name_or_path"]))
    return [p.lower() for p in parts]


def _read_json_file(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}): the download is damaged; pull the model "
                         "again") from exc


def _st_modules(folder: Path) -> list[str]:
    """Module types listed in modules.json (sentence-transformers), e.g. [...Transformer, ...Pooling]."""
    if not (folder / "modules.json").is_file():
        return []
    modules = _read_json_file(folder / "modules.json")
    return [str(m.get("type", "")) for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []


def _st_family(folder: Path) -> tuple[Family | None, str]:
    """Family from the sentence-transformers files of a Qwen3 folder, with the marker that decided it."""
    modules = _st_modules(folder)
    if any(m.endswith("LogitScore") for m in modules):
        return Family.RERANKER, "modules.json with a LogitScore module (causal-LM cross-encoder)"
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and _read_json_file(pooling).get("pooling_mode_lasttoken"):
        return Family.EMBEDDING, "1_Pooling/config.json with last-token pooling"
    if any(m.endswith("Pooling") for m in modules) or (folder / "config_sentence_transformers.json").is_file():
        return Family.EMBEDDING, "sentence-transformers files (modules.json / config_sentence_transformers.json)"
    return None, ""


def detect_hf_folder(path: str | Path) -> dict:
    """Tell family and model type of a Hugging Face folder from config.json, file markers and name.

    Returns {"family": Family | None, "suggested_type": "LLM" | "embedding" | "rerank" | None,
    "rule": "chat" | "last_token" | "yes_no" | "classifier" | None, "reason": str}.
    Only Qwen3 folders get an answer; for others every value but "reason" is None, so the
    caller's generic rules (sentence-transformers files, architectures) decide. A config.json or
    sentence-transformers file that is not valid JSON is an error (ValueError naming the file).
    """
    folder = Path(path)
    config_file = folder / "config.json"
    result = {"family": None, "suggested_type": None, "rule": None, "reason": ""}
    if not config_file.is_file():
        result["reason"] = f"no config.json in {folder}"
        return result
    config = _read_json_file(config_file)
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    if model_type not in QWEN3_MODEL_TYPES:
        result["reason"] = f"config.json model_type is {model_type or 'missing'!r}, not Qwen3"
        return result
    named = [_variant_from_name(n) for n in _name_parts(folder, config)]
    st_family, st_reason = _st_family(folder)
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        family, reason = Family.RERANKER_SEQ_CLS, f"config.json architecture {architectures[0]}"
    elif st_family == Family.RERANKER or Family.RERANKER in named:
        family, reason = Family.RERANKER, st_reason if st_family else f"Qwen3 folder named {folder.name!r}"
    elif st_family == Family.EMBEDDING or Family.EMBEDDING in named or "Qwen3Model" in architectures:
        family = Family.EMBEDDING
        reason = st_reason if st_family else (f"Qwen3 folder named {folder.name!r}"
                                              if Family.EMBEDDING in named else "architecture Qwen3Model")
    else:
        family, reason = Family.CHAT, "Qwen3 causal LM without embedding or reranker markers"
    result.update(family=family, suggested_type=_SUGGESTED_TYPE[family], rule=_RULE_KIND[family], reason=reason)
    return result


def model_type_mismatch(path: str | Path, requested: str) -> str | None:
    """A user-facing error when `requested` contradicts what a Qwen3 folder is; None when it fits.

    Only Qwen3 folders are judged: for other families the folder gives no reliable answer.
    """
    detected = detect_hf_folder(path)
    if detected["family"] is None:
        return None
    wanted = requested.strip().lower()
    wanted = {"chat": "llm", "embed": "embedding", "embeddings": "embedding", "reranker": "rerank"}.get(wanted, wanted)
    if wanted == detected["suggested_type"].lower():
        return None
    return (f"{path} is a {detected['family'].value} model ({detected['reason']}), but it was launched "
            f"as model type {requested!r}: launch it with --model-type {detected['suggested_type']}, "
            f"or leave --model-type out to use the detected type")


def model_family(path: str | Path) -> Family | None:
    """The family of a model folder or GGUF file, for any engine (vLLM included)."""
    path = Path(path)
    if path.is_file():
        return gguf_family(gguf_info(path))
    return detect_hf_folder(path)["family"]


def rule_text(family: Family | str | None) -> str | None:
    return RULES.get(Family(family)) if family else None


# --- Qwen3 rerankers as GGUF -----------------------------------------------------------------
#
# Conversions come in two kinds: llama.cpp's converter (recent versions) writes a classifier
# head `cls.output` holding the lm_head rows of "yes" and "no" and pooling_type RANK, so
# llama.cpp's rank pooling returns softmax([yes, no]) directly; older or third-party
# conversions are plain causal LMs, scored by reading the "yes"/"no" logits at the last
# position of the judging prompt.

GGUF_POOLING_LAST = 3
GGUF_POOLING_RANK = 4  # llama_pooling_type: NONE 0, MEAN 1, CLS 2, LAST 3, RANK 4


def gguf_info(path: str | Path, *, tokens: bool = False) -> dict:
    """The GGUF facts (ragserve.engines.gguf_meta.gguf_facts) plus the family they give."""
    from ragserve.engines.gguf_meta import gguf_facts

    facts = gguf_facts(path, tokens=tokens)
    facts["family"] = gguf_family(facts)
    return facts


def gguf_rerank_mode(path: str | Path) -> str:
    """'rank' for a GGUF with a classifier head (or pooling_type RANK), 'yes_no' for a plain causal LM."""
    info = gguf_info(path)
    if info["has_classifier"] or info["pooling_type"] == GGUF_POOLING_RANK:
        return "rank"
    return "yes_no"


def gguf_yes_no_token_ids(facts: dict) -> tuple[int, int]:
    """Ids of the single tokens "yes" and "no" in a GGUF vocabulary (facts read with tokens=True)."""
    ids: dict[str, int] = {}
    for index, token in enumerate(facts.get("tokens") or []):
        if token in ("yes", "no") and token not in ids:
            ids[token] = index
            if len(ids) == 2:
                break
    missing = [t for t in ("yes", "no") if t not in ids]
    if missing:
        raise ValueError(f"{facts.get('path')} has no single-token {' / '.join(repr(m) for m in missing)} in its "
                         "vocabulary, so the Qwen3 yes/no rerank rule cannot score it: use a reranker GGUF with a "
                         "classifier head (rerank_mode rank)")
    return ids["yes"], ids["no"]


def gguf_family(facts: dict) -> Family | None:
    """The family of a GGUF from its facts (gguf_meta.gguf_facts): architecture, general.name and
    general.basename, the file name, pooling type and classifier head.

    A reranker is known by its head or rank pooling even when the names say nothing; an
    embedding model by last-token pooling or its name.
    """
    arch = str(facts.get("architecture") or "").lower()
    if not arch.startswith("qwen3"):
        return None
    names = " ".join(str(facts.get(k) or "") for k in ("name", "basename"))
    names += " " + Path(str(facts.get("path") or "")).name
    pooling = facts.get("pooling_type")
    if facts.get("has_classifier") or pooling == GGUF_POOLING_RANK:
        return Family.RERANKER
    if pooling == GGUF_POOLING_LAST:
        return Family.EMBEDDING
    return _variant_from_name(names)

