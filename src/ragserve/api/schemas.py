"""Pydantic models of the HTTP protocol: OpenAI routes, /v1/rerank, and Xinference's launch shapes.

Unknown fields are ignored (clients send many vendor extras); wrong types are 400s.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Upper bounds checked before any engine work, so a huge request costs nothing.
MAX_INPUT_ITEMS = 2048
MAX_TEXT_CHARS = 200_000
MAX_DOCUMENTS = 1000
MAX_GENERATION_TOKENS = 32768
# Integers a client may send are bounded like the types engines store them in: a seed is an int64 (as in
# OpenAI's API), counts fit an int32. Beyond that an engine fails (500) instead of the request (400).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_DIMENSIONS = 65536
MAX_CONTEXT = 2**24
# A model uid names the model's files (worker log, spec file) and is part of URLs, so it is a plain name.
UID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
_UID_RE = re.compile(UID_PATTERN)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    reasoning_content: Optional[str] = None

    def text(self) -> str:
        """Content as plain text; OpenAI content parts of type text are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported by these models")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI request fields that change the answer and that no engine here honours yet: refused with a 400 naming the
# field (a 200 that ignored them would give an agent prose where it asked for a tool call or JSON). A value
# that asks for nothing (tools: [], tool_choice: "none", response_format text, logprobs false) is accepted.
_NOT_HONOURED: dict[str, str] = {
    "tools": "tool calling is not supported yet: leave out tools (or use a server with tool calling)",
    "functions": "function calling is not supported yet: leave out functions",
    "function_call": "function calling is not supported yet: leave out function_call",
    "tool_choice": "tool calling is not supported yet: leave out tool_choice",
    "response_format": "structured output (json_object / json_schema) is not supported yet: leave out "
                       "response_format, or ask for JSON in the prompt",
    "logprobs": "logprobs are not supported yet: leave out logprobs",
    "top_logprobs": "logprobs are not supported yet: leave out top_logprobs",
    "logit_bias": "logit_bias is not supported: leave it out",
    "echo": "echo is not supported: leave it out",
    "best_of": "best_of is not supported: leave it out (n=1 only)",
    "suffix": "suffix (insertion) is not supported: leave it out",
    "audio": "audio output is not supported: leave it out",
    "modalities": "only text output is supported: leave out modalities",
    "prediction": "predicted outputs are not supported: leave out prediction",
    "reasoning_effort": "reasoning_effort is not supported: switch thinking with chat_template_kwargs "
                        "{\"enable_thinking\": false} (or enable_thinking)",
}
_NOTHING_ASKED = ({}, [], None, False, "none", {"type": "text"})



class _SamplingFields(_Request):
    # Extra fields are kept (not used) so the gateway can name them once per model in its log.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_GENERATION_TOKENS)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_GENERATION_TOKENS)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    # Declared so that a refusal names its field (param) and /openapi.json lists them; see _NOT_HONOURED.
    tools: Optional[Any] = Field(default=None, description="refused unless empty: " + _NOT_HONOURED["tools"])
    functions: Optional[Any] = Field(default=None, description="refused unless empty")
    function_call: Optional[Any] = Field(default=None, description="refused unless 'none'")
    tool_choice: Optional[Any] = Field(default=None, description="refused unless 'none'")
    response_format: Optional[Any] = Field(default=None, description="refused unless {'type': 'text'}")
    logprobs: Optional[Any] = Field(default=None, description="refused unless false")
    top_logprobs: Optional[Any] = Field(default=None, description="refused")
    logit_bias: Optional[Any] = Field(default=None, description="refused unless empty")
    echo: Optional[Any] = Field(default=None, description="refused unless false")
    best_of: Optional[Any] = Field(default=None, description="refused")
    suffix: Optional[Any] = Field(default=None, description="refused")
    audio: Optional[Any] = Field(default=None, description="refused")
    modalities: Optional[Any] = Field(default=None, description="refused unless ['text']")
    prediction: Optional[Any] = Field(default=None, description="refused")
    reasoning_effort: Optional[Any] = Field(default=None, description="refused: use enable_thinking")

    @field_validator(*_NOT_HONOURED, mode="before")
    @classmethod
    def _refuse_not_honoured(cls, value: Any, info: ValidationInfo) -> Any:
        if any(value == nothing for nothing in _NOTHING_ASKED) or value == ["text"]:
            return value
        raise ValueError(_NOT_HONOURED[info.field_name])

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # Passed to the chat template; Qwen3 reads enable_thinking. vLLM and SGLang accept both forms.
    chat_template_kwargs: Optional[dict[str, Any]] = None
    enable_thinking: Optional[bool] = None

    @model_validator(mode="after")
    def _check_messages(self) -> "ChatCompletionRequest":
        total = 0
        for message in self.messages:
            total += len(message.text())
        if total > MAX_TEXT_CHARS:
            raise ValueError(f"messages hold {total} characters; the limit is {MAX_TEXT_CHARS}")
        return self

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.enable_thinking is not None:
            kwargs.setdefault("enable_thinking", self.enable_thinking)
        return kwargs


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Union[str, list[str]]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"prompt holds {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
        return value


EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1, le=MAX_DIMENSIONS)
    user: Optional[str] = None
    # Query vs document: instruction-tuned embedders (Qwen3-Embedding) prefix queries only.
    # `input_type` follows Cohere/Jina/NVIDIA naming; `is_query` is accepted as a boolean alias.
    input_type: Optional[Literal["query", "document", "search_query", "search_document", "passage"]] = None
    is_query: Optional[bool] = None
    # Xinference passes sentence-transformers' prompt_name ("query" / "document").
    prompt_name: Optional[Literal["query", "document", "passage"]] = None
    instruction: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: EmbeddingInput) -> EmbeddingInput:
        items = [value] if isinstance(value, str) else value
        if isinstance(value, list) and value and isinstance(value[0], int):
            items = [value]
        if len(items) == 0:
            raise ValueError("input must not be empty: send a string or a non-empty list of strings")
        if len(items) > MAX_INPUT_ITEMS:
            raise ValueError(f"input holds {len(items)} items; the limit is {MAX_INPUT_ITEMS} per request")
        for item in items:
            if isinstance(item, str):
                if not item.strip():
                    raise ValueError("input strings must not be empty")
                if len(item) > MAX_TEXT_CHARS:
                    raise ValueError(f"an input holds {len(item)} characters; the limit is {MAX_TEXT_CHARS}")
            elif isinstance(item, list) and not item:
                raise ValueError("token-id inputs must not be empty")
        return value

    def wants_query(self) -> bool:
        if self.is_query is not None:
            return self.is_query
        if self.prompt_name is not None:
            return self.prompt_name == "query"
        return self.input_type in ("query", "search_query")


class RerankRequest(_Request):
    """Xinference / Jina / Cohere rerank request; `texts` is accepted for TEI-style clients."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    documents: list[Union[str, dict[str, Any]]] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: Optional[int] = Field(default=None, ge=1, le=INT32_MAX)
    return_documents: Optional[bool] = None
    return_len: Optional[bool] = None
    max_chunks_per_doc: Optional[int] = Field(default=None, ge=1, le=INT32_MAX)
    instruction: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _texts_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "documents" not in data and "texts" in data:
            data = {**data, "documents": data["texts"]}
        return data

    @field_validator("documents")
    @classmethod
    def _document_texts(cls, value: list[Union[str, dict[str, Any]]]) -> list[str]:
        texts = []
        for doc in value:
            if isinstance(doc, dict):  # Cohere v1 / Jina accept {"text": ...}
                doc = doc.get("text")
                if not isinstance(doc, str):
                    raise ValueError("document objects must have a string field 'text'")
            if len(doc) > MAX_TEXT_CHARS:
                raise ValueError(f"a document holds {len(doc)} characters; the limit is {MAX_TEXT_CHARS}")
            texts.append(doc)
        return texts

    @field_validator("max_chunks_per_doc")
    @classmethod
    def _no_chunking(cls, value: Optional[int]) -> Optional[int]:
        # Cohere's option splits a long document and scores its best chunk; we cut each (query, document)
        # pair to the model's context instead (counted in meta.truncated_documents). Refused, never ignored.
        if value is not None:
            raise ValueError("max_chunks_per_doc is not supported: each document is cut to the model's context "
                             "(meta.truncated_documents counts them); leave it out, or split documents yourself")
        return value


class LaunchRequest(_Request):
    """POST /v1/models in Xinference's shape (what `xinference launch` and its RESTfulClient send)."""

    model_uid: Optional[str] = Field(default=None, pattern=UID_PATTERN)
    model_name: str = Field(min_length=1, max_length=128)
    model_type: str = "LLM"
    model_engine: Optional[str] = None
    model_path: Optional[str] = None
    model_format: Optional[str] = None
    quantization: Optional[str] = None
    model_size_in_billions: Optional[Union[float, str]] = None
    size_in_billions: Optional[Union[float, str]] = None
    n_ctx: Optional[int] = Field(default=None, ge=16, le=MAX_CONTEXT)
    n_parallel: Optional[int] = Field(default=None, ge=1, le=64)
    source: Optional[str] = None
    revision: Optional[str] = None
    force: bool = False
    wait_ready: bool = True
    options: dict[str, Any] = Field(default_factory=dict)
    # Xinference passes engine kwargs flat at the top level (e.g. n_ctx, reasoning_content).
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @field_validator("model_name")
    @classmethod
    def _name_rule(cls, value: str, info: ValidationInfo) -> str:
        if not info.data.get("model_uid") and not _UID_RE.fullmatch(value):
            raise ValueError(f"{value[:40]!r} cannot be the model's uid, which it is when model_uid is not given: "
                             f"use letters, digits, '.', '_' and '-' (starting with a letter or digit, at most 128), "
                             f"or pass a model_uid of that form")
        if _CONTROL_RE.search(value):
            raise ValueError("model_name must not hold control characters (newline, NUL, ...)")
        return value

    def size_b(self) -> Optional[float]:
        raw = self.size_in_billions or self.model_size_in_billions
        if raw in (None, ""):
            return None
        try:
            return float(str(raw).replace("_", "."))
        except ValueError as exc:
            raise ValueError(f"size_in_billions must be a number, got {raw!r}") from exc
