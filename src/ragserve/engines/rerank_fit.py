"""Fitting (query, document) pairs into a reranker's context, by one rule on every engine.

RAGFlow and other Xinference clients send rerank documents untruncated; one chunk longer than the
model's context must not turn the whole request into an error. As Xinference and the Qwen3-Reranker
model card do, an over-long pair is cut to the context instead: the document loses its tail, while the
query and the judging prompt's fixed parts stay whole (for the yes/no rule that includes the suffix
after the document, at whose last position the score is read). The document keeps the longest head
of its tokens with which the whole prompt fits. A query that leaves no room for any document token
is the caller's error (400): no cut of the document can make it fit.

Each engine counts with its own tokenizer; this module holds what they share: the room check, the
search for the longest head when the document is passed as text, the log line and the stop check.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from ragserve.engines.base import EngineInputError, EngineStopped, ShouldStop

log = logging.getLogger("ragserve.rerank")


def check_room(fixed_tokens: int, limit: int, *, fix: str) -> int:
    """Tokens left for the document once the query and the prompt's fixed parts take `fixed_tokens`
    of `limit`; an EngineInputError (400) naming the fix when nothing is left."""
    room = limit - fixed_tokens
    if room < 1:
        raise EngineInputError(
            f"the query with the reranker's fixed prompt takes {fixed_tokens} tokens of the {limit} that one "
            f"(query, document) pair may hold in this model's context, which leaves no room for a document: "
            f"shorten the query, or {fix}")
    return room


def longest_head(size: int, total: Callable[[int], int], limit: int, guess: int) -> int:
    """The largest k <= size such that total(k) <= limit, where total(k) counts the whole prompt with
    the document cut to its first k tokens (given as text, so the tokens across the cut may merge).

    Starts from `guess` and steps by the overshoot: total(k) moves almost one for one with k, so this
    takes one or two tokenizer calls. total(0) must fit (check_room before).
    """
    k = max(0, min(size, guess))
    count = total(k)
    while count > limit and k > 0:
        k = max(0, k - (count - limit))
        count = total(k)
    while k < size and total(k + 1) <= limit:
        k += 1
    return k


def report(truncated: Sequence[bool], limit: int, model: str) -> None:
    """One warning line per engine call that cut documents (a request, unless the worker merged
    concurrent requests with the same query into one call)."""
    cut = sum(bool(t) for t in truncated)
    if cut:
        log.warning("rerank %s: %d of %d documents were too long for the context and were cut: each of their "
                    "pairs now holds %d tokens at most (query and prompt kept whole)", model, cut, len(truncated), limit)


def check_stop(should_stop: Optional[ShouldStop]) -> None:
    """Raise EngineStopped once `should_stop` says every caller has gone."""
    if should_stop is not None and should_stop():
        raise EngineStopped("the engine call was stopped early: every caller has gone")
