"""GGUF rerankers through llama.cpp: rank pooling (classifier head) or the Qwen3 yes/no rule.

rank   - llama.cpp's rank pooling over the GGUF's classifier head gives the score, one document at a
         time; the pair is formatted by the GGUF's "rerank" template (or llama.cpp's generic one).
yes_no - a plain causal LM (Qwen3-Reranker conversions): the score is P("yes") / (P("yes") + P("no"))
         at the last position of the judging prompt prefix + pair(instruction, query, document) + suffix.

Batching of the yes/no rule (launch option `rerank_batching`):
  fast  (default) - documents run as parallel sequences on n_parallel slots (continuous batching puts
        them in one llama.cpp batch), and each slot keeps its prompt cache, so the judging prompt's
        common prefix (system + instruction + query) is evaluated once per slot, not once per document.
        Which slot and which batch a document lands in changes the floating-point summation order; on
        quantized weights that moves scores slightly (README: "Rerank batching").
  exact - one document at a time, no prompt cache: a score never depends on its neighbours.

Long pairs are cut to the context (ragserve.engines.rerank_fit): the yes/no rule cuts the pair's
tokens as the Qwen3-Reranker model card does (prefix and suffix kept whole) and sends token ids;
rank pooling takes text, so the document is cut to the longest head whose formatted pair fits.
"""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Optional, Sequence, TypeVar

from ragserve.control.spec import ModelSpec
from ragserve.engines import qwen3, rerank_fit
from ragserve.engines.base import EngineError, EngineInputError, RerankEngine, RerankOutput, ShouldStop
from ragserve.engines.defaults import LLAMA_EMBED_CTX, RERANK_BATCHING, llama_rerank_slots
from ragserve.engines.llama_cpp import _raise_on_error, _server

# Raising both candidate logits by the same constant leaves their softmax unchanged, and makes
# them the only two tokens that survive top_k=2: their post-sampling probabilities are exactly
# softmax(logit_yes, logit_no), whatever the rest of the vocabulary holds.
_YES_NO_BIAS = 100.0
# llama.cpp's generic rank format (no "rerank" template) adds at most BOS, EOS, SEP and EOS around
# the query and document; reserved whole, so a cut pair always fits.
_GENERIC_RANK_SPECIALS = 4
_FIX_CONTEXT = "launch the model with a larger --n-ctx"

T = TypeVar("T")


class LlamaTokenizer:
    """llama.cpp's own tokenizer for the loaded model, through the in-process server's /tokenize and
    /detokenize routes (the binding has no direct call): the very tokens llama.cpp feeds the model."""

    def __init__(self, server: Any) -> None:
        import httpx

        # Loopback to our own process: never through a proxy from the environment.
        self._client = httpx.Client(base_url=server.listening_address, timeout=120, trust_env=False)

    def tokens(self, text: str, *, parse_special: bool = True) -> list[int]:
        body = self._post("/tokenize", {"content": text, "add_special": False, "parse_special": parse_special})
        return [int(t) for t in body["tokens"]]

    def text(self, tokens: Sequence[int]) -> str:
        # A cut inside a multi-byte character leaves a replacement character: drop it.
        return str(self._post("/detokenize", {"tokens": list(tokens)})["content"]).rstrip("\ufffd")

    def _post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = self._client.post(route, json=payload)
        if response.status_code != 200:
            raise EngineError(f"llama.cpp {route} failed ({response.status_code}): {response.text[:200]}")
        return response.json()

    def close(self) -> None:
        self._client.close()


class LlamaRerankEngine(RerankEngine):
    def __init__(self, spec: ModelSpec, metadata: dict[str, Any]):
        super().__init__(spec)
        self.metadata = metadata
        self.mode = spec.options.get("rerank_mode") or self._detect_mode()
        if self.mode not in ("rank", "yes_no"):
            raise EngineError(f"rerank_mode {self.mode!r} is unknown: use 'rank' (classifier head) or 'yes_no' "
                              f"(Qwen3-Reranker rule on a causal LM)")
        if "cache_prompt" in spec.options:
            raise EngineError("the cache_prompt option is replaced by rerank_batching: 'fast' (parallel slots that "
                              "reuse the cached prompt prefix, the default) or 'exact' (one document at a time)")
        self.batching = str(spec.options.get("rerank_batching") or "fast").strip().lower()
        if self.batching not in RERANK_BATCHING:
            raise EngineError(f"rerank_batching {spec.options['rerank_batching']!r} is unknown: use 'fast' (parallel "
                              f"slots sharing the prompt prefix, the default) or 'exact' (one document at a time)")
        trained = int(metadata.get("context_length") or LLAMA_EMBED_CTX)
        self.n_ctx = int(spec.n_ctx or min(trained, LLAMA_EMBED_CTX))
        if self.mode == "rank":
            self._init_rank(spec, metadata)
        else:
            self._init_yes_no(spec, metadata)
        self.tokenizer = LlamaTokenizer(self.server)

    def _init_rank(self, spec: ModelSpec, metadata: dict[str, Any]) -> None:
        if not metadata.get("has_classifier"):
            raise EngineError(f"{spec.model_path} has no classifier head, so rank pooling cannot score it: "
                              f"use rerank_mode yes_no (Qwen3-Reranker causal-LM rule)")
        # Rank pooling evaluates each pair whole in one ubatch: one document at a time in either batching.
        self.n_parallel = 1
        self.limit = self.n_ctx - 1  # llama.cpp refuses a prompt that fills the whole context
        self.rank_template = (metadata.get("fields") or {}).get("tokenizer.chat_template.rerank")
        self.server = _server(spec, n_ctx=self.n_ctx, n_parallel=1, embedding=True, pooling="rank")

    def _init_yes_no(self, spec: ModelSpec, metadata: dict[str, Any]) -> None:
        ids = metadata.get("token_ids", {})
        self.yes_id = ids.get("yes", ids.get("\u0120yes"))
        self.no_id = ids.get("no", ids.get("\u0120no"))
        if self.yes_id is None or self.no_id is None:
            raise EngineError(f"{spec.model_path} has no 'yes'/'no' tokens, so the yes/no rerank rule cannot "
                              f"score it: use a reranker GGUF with a classifier head (rerank_mode rank)")
        if self.batching == "exact" and int(spec.n_parallel or spec.options.get("n_parallel") or 1) != 1:
            raise EngineError("rerank_batching=exact scores one document at a time: leave n_parallel out, or use "
                              "rerank_batching=fast for parallel slots")
        self.n_parallel = llama_rerank_slots(spec.n_parallel, spec.options)
        # llama.cpp needs one free position after the prompt (for the token it samples).
        self.limit = self.n_ctx - 1
        # Slots share one unified KV cache of n_ctx per slot: any mix of pairs up to n_ctx fits, cached
        # prefixes of idle slots included. The host-RAM prompt cache would only copy KV around.
        self.server = _server(spec, n_ctx=self.n_ctx * self.n_parallel, n_parallel=self.n_parallel,
                              prompt_cache_mib=0)
        self.pool = ThreadPoolExecutor(max_workers=self.n_parallel, thread_name_prefix="rerank")
        self._frame: dict[str, list[int]] = {}

    def _detect_mode(self) -> str:
        mode = qwen3.gguf_rerank_mode(self.spec.model_path)
        if (mode == "rank" and qwen3.gguf_family(self.metadata) == "qwen3-reranker"
                and not self.metadata.get("has_rerank_template")):
            # Without the converter's "rerank" template llama.cpp would fill a generic query/document
            # format, which is not the Qwen3 judging prompt: score by the yes/no rule instead.
            return "yes_no"
        return mode

    def describe(self) -> dict[str, Any]:
        batching = self.batching if self.mode == "yes_no" else "exact"
        family = self.metadata.get("family")
        return {"rerank_mode": self.mode, "rerank_batching": batching, "parallel": self.n_parallel,
                "context_length": self.n_ctx, "architecture": self.metadata.get("architecture"),
                "family": family, "rule": self._rule(family)}

    def _rule(self, family: str | None) -> str:
        """The scoring rule in force, also for a model outside the Qwen3 family scored by its rule."""
        if self.mode == "yes_no":
            return qwen3.rule_text(qwen3.Family.RERANKER)
        return qwen3.rule_text(family) or "rank pooling: the GGUF's classifier head scores (query, document)"

    def close(self) -> None:
        self.tokenizer.close()

    def rerank(self, query: str, documents: Sequence[str], *, instruction: Optional[str] = None,
               should_stop: Optional[ShouldStop] = None) -> RerankOutput:
        if not documents:
            return RerankOutput(scores=[], prompt_tokens=0, token_counts=[], truncated=[])
        if self.mode == "rank":
            if instruction:
                raise EngineInputError("this reranker scores with its classifier head and the instruction built "
                                       "into its GGUF template; leave `instruction` out, or launch it with "
                                       "--rerank_mode yes_no to use custom instructions")
            results = self._rank_all(query, documents, should_stop)
        else:
            instruction = instruction or self.spec.options.get("rerank_instruction")
            results = self._yes_no_all(query, documents, instruction, should_stop)
        truncated = [cut for _, _, cut in results]
        rerank_fit.report(truncated, self.limit, self.spec.model_name)
        counts = [tokens for _, tokens, _ in results]
        return RerankOutput(scores=[score for score, _, _ in results], prompt_tokens=sum(counts),
                            token_counts=counts, truncated=truncated)

    # ---- yes/no rule ------------------------------------------------------------------------

    def _yes_no_all(self, query: str, documents: Sequence[str], instruction: Optional[str],
                    should_stop: Optional[ShouldStop]) -> list[tuple[float, int, bool]]:
        prefix, suffix = self._frame_tokens("prefix"), self._frame_tokens("suffix")
        empty_pair = self.tokenizer.tokens(qwen3.rerank_pair_text(query, "", instruction))
        rerank_fit.check_room(len(prefix) + len(empty_pair) + len(suffix), self.limit, fix=_FIX_CONTEXT)
        pair_room = self.limit - len(prefix) - len(suffix)

        def score(document: str) -> tuple[float, int, bool]:
            # The model card's recipe: the pair is tokenized whole and cut to the room the frame leaves.
            pair = self.tokenizer.tokens(qwen3.rerank_pair_text(query, document, instruction))
            ids = prefix + pair[:pair_room] + suffix
            return self._yes_no(ids), len(ids), len(pair) > pair_room

        return self._on_slots(score, documents, should_stop)

    def _frame_tokens(self, part: str) -> list[int]:
        if part not in self._frame:
            self._frame[part] = self.tokenizer.tokens(qwen3.RERANK_PREFIX if part == "prefix" else qwen3.RERANK_SUFFIX)
        return self._frame[part]

    def _yes_no(self, ids: list[int]) -> float:
        payload = {
            "prompt": ids,
            "n_predict": 1, "n_probs": 2, "post_sampling_probs": True,
            "temperature": 1.0, "top_k": 2, "samplers": ["top_k", "temperature"],
            "logit_bias": [[self.yes_id, _YES_NO_BIAS], [self.no_id, _YES_NO_BIAS]],
            # fast: a slot reuses the cached tokens its previous document shares with this one.
            "cache_prompt": self.batching == "fast",
        }
        result = _raise_on_error(self.server.handle_completions(payload))
        top = result["choices"][0]["logprobs"]["content"][0]["top_probs"]
        probs = {t["id"]: float(t["prob"]) for t in top}
        p_yes, p_no = probs.get(self.yes_id, 0.0), probs.get(self.no_id, 0.0)
        return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.0

    def _on_slots(self, work: Callable[[str], T], items: Sequence[str],
                  should_stop: Optional[ShouldStop]) -> list[T]:
        """work(item) for every item, at most n_parallel at once (one per slot), results in input order.

        `should_stop` is asked before each item starts; running items finish, later ones never start.
        """
        results: list[Any] = [None] * len(items)
        running: dict[Future, int] = {}

        def collect(futures) -> None:
            for future in futures:
                results[running.pop(future)] = future.result()

        for index, item in enumerate(items):
            if len(running) >= self.n_parallel:
                collect(wait(running, return_when=FIRST_COMPLETED).done)
            rerank_fit.check_stop(should_stop)
            running[self.pool.submit(work, item)] = index
        collect(list(running))
        return results

    # ---- rank pooling -----------------------------------------------------------------------

    def _rank_all(self, query: str, documents: Sequence[str],
                  should_stop: Optional[ShouldStop]) -> list[tuple[float, int, bool]]:
        rerank_fit.check_room(self._rank_total(query, ""), self.limit, fix=_FIX_CONTEXT)
        results = []
        for document in documents:  # one at a time anyway (one slot): stop between documents
            rerank_fit.check_stop(should_stop)
            text, cut = self._rank_fit(query, document)
            score, tokens = self._rank(query, text)
            results.append((score, tokens, cut))
        return results

    def _rank_total(self, query: str, document: str) -> int:
        """Tokens of the pair as llama.cpp formats it for rank pooling."""
        if self.rank_template:
            prompt = self.rank_template.replace("{query}", query).replace("{document}", document)
            return len(self.tokenizer.tokens(prompt))
        return (len(self.tokenizer.tokens(query, parse_special=False))
                + len(self.tokenizer.tokens(document, parse_special=False)) + _GENERIC_RANK_SPECIALS)

    def _rank_fit(self, query: str, document: str) -> tuple[str, bool]:
        """The document, or its longest head (in its own tokens) whose formatted pair fits the context."""
        total = self._rank_total(query, document)
        if total <= self.limit:
            return document, False
        ids = self.tokenizer.tokens(document, parse_special=self.rank_template is not None)
        head = lambda k: self.tokenizer.text(ids[:k])  # noqa: E731
        keep = rerank_fit.longest_head(len(ids), lambda k: self._rank_total(query, head(k)), self.limit,
                                       guess=len(ids) - (total - self.limit))
        return head(keep), True

    def _rank(self, query: str, document: str) -> tuple[float, int]:
        result = _raise_on_error(self.server.handle_rerank(
            {"query": query, "documents": [document], "top_n": 1, "return_text": False}))
        score = float(result["results"][0]["relevance_score"])
        if (self.metadata.get("classifier_outputs") or 1) == 1:
            # One logit per pair (cross-encoder heads): map to a probability as sentence-transformers does.
            score = 1.0 / (1.0 + math.exp(-score))
        return score, int((result.get("usage") or {}).get("prompt_tokens", 0))
