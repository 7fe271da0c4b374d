"""The engine interface: one class per model type; a new engine implements it in one file.

Engines are synchronous and run inside a worker process. The worker owns HTTP, batching
and the OpenAI response shapes; an engine only turns inputs into tokens, vectors or scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ragserve.control.spec import ModelSpec, ModelType


class EngineError(Exception):
    """A load or inference failure with a message meant for the user (cause and fix)."""


class EngineInputError(EngineError):
    """The request cannot be served by this model as given (too long, unsupported option): a 400."""


class EngineStopped(EngineError):
    """The call ended early because its `should_stop` said so: nobody waits for its results."""


# Asked between documents (rerank) or batches (embed): True once every caller of the call has gone.
ShouldStop = Callable[[], bool]


@dataclass
class GenerationRequest:
    """A chat (messages) or plain completion (prompt) request, already validated."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Passed to the chat template, e.g. {"enable_thinking": False} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationDelta:
    """One piece of generated text. The last delta carries finish_reason and token counts."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class EmbeddingOutput:
    vectors: list[list[float]]
    prompt_tokens: int
    # Tokens per text, where the engine knows them: exact usage for each caller of a merged batch.
    token_counts: list[int] | None = None


@dataclass
class RerankOutput:
    scores: list[float]  # one per document, in input order
    prompt_tokens: int
    token_counts: list[int] | None = None  # per document, where the engine knows them
    # Per document: True where the (query, document) pair was longer than the model's context and the
    # document side was cut to fit (the worker counts them in the response's meta).
    truncated: list[bool] | None = None


class Engine(ABC):
    """Common part: load from a spec, report facts, free memory on close."""

    model_type: ModelType

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        """Facts shown by GET /v1/models/{uid} (context length, dimensions, rerank rule...)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine memory. The worker process exits afterwards anyway."""


class LLMEngine(Engine):
    model_type = ModelType.LLM
    # How many requests the engine can run at once (llama.cpp slots, vLLM sequences).
    max_concurrency: int = 1

    @abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[GenerationDelta]:
        """Yield text as it is produced; the final delta has finish_reason and usage."""

    @abstractmethod
    def render_prompt(self, request: GenerationRequest) -> str:
        """The text the model continues: the chat template applied to the messages, or the raw prompt.
        Every chat engine renders it, so that reasoning opened by the template is known (opens_reasoning)."""

    def opens_reasoning(self, request: GenerationRequest) -> bool:
        """Whether the chat template leaves `<think>` open, so the output starts inside reasoning.

        Decided here for every engine, from the prompt the engine renders (Qwen3 thinking
        models, QwQ and R1 distills end their generation prompt with `<think>`).
        """
        from ragserve.engines.reasoning import prompt_opens_reasoning

        return request.messages is not None and prompt_opens_reasoning(self.render_prompt(request))


class EmbeddingEngine(Engine):
    model_type = ModelType.EMBEDDING

    @property
    @abstractmethod
    def dimensions(self) -> int: ...

    # True where the model was trained with Matryoshka losses and may be cut (`dimensions`).
    supports_dimensions: bool = False
    max_batch_size: int = 64

    @abstractmethod
    def embed(self, texts: Sequence[str], *, is_query: bool = False,
              instruction: str | None = None, should_stop: ShouldStop | None = None) -> EmbeddingOutput:
        """Return one full-size vector per text, normalised where the model's recipe normalises.

        The worker cuts vectors to a requested `dimensions` and renormalises them. `should_stop`,
        where given, is asked between internal batches; once it returns True the engine raises
        EngineStopped instead of embedding the rest (every caller has gone).
        """


class RerankEngine(Engine):
    model_type = ModelType.RERANK
    max_batch_size: int = 32

    @abstractmethod
    def rerank(self, query: str, documents: Sequence[str], *,
               instruction: str | None = None, should_stop: ShouldStop | None = None) -> RerankOutput:
        """Score each document against the query; higher is more relevant.

        A (query, document) pair longer than the model's context is cut on the document side to fit
        (flagged in RerankOutput.truncated); a query that leaves no room for any document is an
        EngineInputError. `should_stop`, where given, is asked before each document (or internal
        batch) is started; once it returns True the engine raises EngineStopped: documents already
        running finish, no new one starts.
        """
