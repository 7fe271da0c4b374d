"""The end-to-end check of a served stack, as the seed guide does by hand in RAGFlow.

Ask the chat model a question; embed a tiny knowledge base and retrieve for a few
questions; rerank the candidates and measure retrieval with rerank on and off (hits@1, MRR);
answer one question from the retrieved passage. Each step is a plain HTTP call a RAG app would make.

A reranker that makes retrieval worse fails the check. One launched with the option
`demo_only: true` (the demo stack's chat model scored as a reranker: the code path is real,
the ranking is not) gets a warning row instead, whatever its figures: never "ok".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import numpy as np

KNOWLEDGE_BASE = [
    "Paris is the capital of France and its largest city.",
    "The Great Barrier Reef lies off the coast of Queensland, Australia.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants.",
]
QUESTIONS = [  # (question, index of the passage that answers it)
    ("Which city is the capital of France?", 0),
    ("Where is the Great Barrier Reef?", 1),
    ("How do plants make sugar from light?", 2),
]


# The launch option that marks a model as a code-path demo, shown by the server under `options`.
DEMO_OPTION = "demo_only"


@dataclass
class StepResult:
    name: str
    ok: bool
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)
    warning: bool = False  # passed, but the table must say why it is not "ok"

    @property
    def verdict(self) -> str:
        return "FAIL" if not self.ok else "WARN" if self.warning else "ok"


def _post(http: httpx.Client, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=payload)
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise RuntimeError(f"{path} answered {response.status_code}: {message}")
    return response.json()


def pick_models(models: list[dict[str, Any]]) -> dict[str, Optional[str]]:
    """The first ready model of each type, for a check run without names."""
    chosen: dict[str, Optional[str]] = {"LLM": None, "embedding": None, "rerank": None}
    for model in models:
        if model.get("state", "ready") == "ready" and chosen.get(model["model_type"], "x") is None:
            chosen[model["model_type"]] = model["id"]
    return chosen


def is_demo(models: list[dict[str, Any]], uid: str) -> bool:
    return any(m.get("id") == uid and bool((m.get("options") or {}).get(DEMO_OPTION)) for m in models)


def ranking_metrics(orders: dict[int, list[int]]) -> dict[str, float]:
    """hits@1 and mean reciprocal rank of the passage that answers each question."""
    ranks = [orders[i].index(answer) + 1 for i, (_q, answer) in enumerate(QUESTIONS)]
    return {"hits_at_1": sum(r == 1 for r in ranks) / len(ranks), "mrr": sum(1 / r for r in ranks) / len(ranks)}


def judge_rerank(off: dict[str, float], on: dict[str, float], demo: bool, baseline: str) -> tuple[bool, bool, str]:
    """(ok, warning, detail): rerank that lowers hits@1 or MRR fails, a demo reranker always warns."""
    n = len(QUESTIONS)
    figures = (f"hits@1 {round(off['hits_at_1'] * n)}/{n} -> {round(on['hits_at_1'] * n)}/{n}, "
               f"MRR {off['mrr']:.2f} -> {on['mrr']:.2f} (rerank off -> on; off = {baseline})")
    lowered = [name for name, key in (("hits@1", "hits_at_1"), ("MRR", "mrr")) if on[key] < off[key] - 1e-9]
    if demo:
        verdict = f"rerank lowers {' and '.join(lowered)}" if lowered else "figures shown for the code path only"
        return True, True, (f"code-path demo reranker ({DEMO_OPTION}): ranking quality is not claimed; {verdict}. "
                            f"{figures}. Use a real reranker (e.g. Qwen3-Reranker) for quality")
    if lowered:
        return False, False, (f"rerank makes retrieval worse: it lowers {' and '.join(lowered)}. {figures}. "
                              "Check the reranker (its rerank_mode, instruction and template) or use another one")
    return True, False, figures


def run_check(endpoint: str, chat: Optional[str], embedding: Optional[str], rerank: Optional[str],
              api_key: Optional[str] = None) -> list[StepResult]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[StepResult] = []
    with httpx.Client(base_url=endpoint.rstrip("/"), headers=headers, timeout=300) as http:
        listed = http.get("/v1/models").json()["data"]
        picked = pick_models(listed)
        chat, embedding, rerank = chat or picked["LLM"], embedding or picked["embedding"], rerank or picked["rerank"]

        def step(name: str, fn) -> Any:
            started = time.perf_counter()
            warning = False
            try:
                ok, detail, data, *rest = fn()
                warning = bool(rest and rest[0])
            except Exception as exc:  # a failed step is reported, the check goes on
                ok, detail, data = False, str(exc), {}
            results.append(StepResult(name, ok, detail, time.perf_counter() - started, data, warning))
            return data

        if chat:
            def ask():
                body = _post(http, "/v1/chat/completions", {
                    "model": chat, "temperature": 0, "max_tokens": 64,
                    "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]})
                answer = body["choices"][0]["message"]["content"] or ""
                return "paris" in answer.lower(), f"answer: {answer.strip()!r}", {"answer": answer}
            step(f"chat ({chat})", ask)
        else:
            results.append(StepResult("chat", False, "no LLM is running: launch one", 0.0))

        retrieved: dict[int, list[int]] = {}
        if embedding:
            def retrieve():
                docs = _post(http, "/v1/embeddings", {"model": embedding, "input": KNOWLEDGE_BASE,
                                                      "input_type": "document"})
                queries = _post(http, "/v1/embeddings", {"model": embedding, "input": [q for q, _ in QUESTIONS],
                                                         "input_type": "query"})
                d = np.array([x["embedding"] for x in sorted(docs["data"], key=lambda x: x["index"])])
                q = np.array([x["embedding"] for x in sorted(queries["data"], key=lambda x: x["index"])])
                d /= np.linalg.norm(d, axis=1, keepdims=True)
                q /= np.linalg.norm(q, axis=1, keepdims=True)
                sims = q @ d.T
                hits = 0
                lines = []
                for i, (question, answer_index) in enumerate(QUESTIONS):
                    order = [int(j) for j in np.argsort(-sims[i])]
                    retrieved[i] = order
                    hits += order[0] == answer_index
                    lines.append(f"{question!r} -> passage {order[0]} ({sims[i][order[0]]:.2f})")
                return hits == len(QUESTIONS), f"{hits}/{len(QUESTIONS)} top-1 hits; " + "; ".join(lines), {}
            step(f"retrieval ({embedding})", retrieve)
        else:
            results.append(StepResult("retrieval", False, "no embedding model is running: launch one", 0.0))

        if rerank:
            demo = is_demo(listed, rerank)
            step(f"rerank ({rerank})", lambda: _rerank_step(http, rerank, retrieved, demo))
        else:
            results.append(StepResult("rerank", False, "no rerank model is running: launch one", 0.0))

        if chat and retrieved:
            def rag_answer():
                passage = KNOWLEDGE_BASE[retrieved[0][0]]
                body = _post(http, "/v1/chat/completions", {
                    "model": chat, "temperature": 0, "max_tokens": 64,
                    "messages": [{"role": "system", "content": f"Answer from this passage: {passage}"},
                                 {"role": "user", "content": QUESTIONS[0][0]}]})
                answer = (body["choices"][0]["message"]["content"] or "").strip()
                return "paris" in answer.lower(), f"answer with retrieved context: {answer!r}", {}
            step("answer from the knowledge base", rag_answer)
    return results


def _rerank_step(http: httpx.Client, rerank: str, retrieved: dict[int, list[int]],
                 demo: bool) -> tuple[bool, str, dict[str, Any], bool]:
    """Rerank each question's retrieved passages; compare hits@1 and MRR with the retrieval order."""
    full = len(retrieved) == len(QUESTIONS)
    baseline = "embedding retrieval" if full else "knowledge-base order, as retrieval failed"
    before = {i: retrieved[i] if full else list(range(len(KNOWLEDGE_BASE))) for i in range(len(QUESTIONS))}
    after = {}
    for i, (question, _) in enumerate(QUESTIONS):
        body = _post(http, "/v1/rerank", {"model": rerank, "query": question,
                                          "documents": [KNOWLEDGE_BASE[j] for j in before[i]],
                                          "return_documents": False, "return_len": True})
        after[i] = [before[i][r["index"]] for r in body["results"]]
        if sorted(after[i]) != sorted(before[i]):
            raise RuntimeError("rerank did not return every document exactly once")
    off, on = ranking_metrics(before), ranking_metrics(after)
    ok, warning, detail = judge_rerank(off, on, demo, baseline)
    return ok, detail, {"off": off, "on": on, "demo": demo, "orders": {"off": before, "on": after}}, warning
