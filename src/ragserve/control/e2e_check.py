"""The end-to-end check of a served stack, as the seed guide does by hand in RAGFlow.

Ask the chat model a question; embed a tiny knowledge base and retrieve for a few
questions; rerank the candidates and compare the order with rerank on and off; answer one
question from the retrieved passage. Each step is a plain HTTP call a RAG app would make.
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


@dataclass
class StepResult:
    name: str
    ok: bool
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)


def _post(http: httpx.Client, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=payload)
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise RuntimeError(f"{path} answered {response.status_code}: {message}")
    return response.json()


def pick_models(http: httpx.Client) -> dict[str, Optional[str]]:
    """The first ready model of each type, for a check run without names."""
    chosen: dict[str, Optional[str]] = {"LLM": None, "embedding": None, "rerank": None}
    for model in http.get("/v1/models").json()["data"]:
        if model.get("state", "ready") == "ready" and chosen.get(model["model_type"], "x") is None:
            chosen[model["model_type"]] = model["id"]
    return chosen


def run_check(endpoint: str, chat: Optional[str], embedding: Optional[str], rerank: Optional[str],
              api_key: Optional[str] = None) -> list[StepResult]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[StepResult] = []
    with httpx.Client(base_url=endpoint.rstrip("/"), headers=headers, timeout=300) as http:
        picked = pick_models(http)
        chat, embedding, rerank = chat or picked["LLM"], embedding or picked["embedding"], rerank or picked["rerank"]

        def step(name: str, fn) -> Any:
            started = time.perf_counter()
            try:
                ok, detail, data = fn()
            except Exception as exc:  # a failed step is reported, the check goes on
                ok, detail, data = False, str(exc), {}
            results.append(StepResult(name, ok, detail, time.perf_counter() - started, data))
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
            def rerank_step():
                changed, lines = 0, []
                for i, (question, _) in enumerate(QUESTIONS):
                    before = retrieved.get(i, list(range(len(KNOWLEDGE_BASE))))
                    body = _post(http, "/v1/rerank", {"model": rerank, "query": question,
                                                      "documents": [KNOWLEDGE_BASE[j] for j in before],
                                                      "return_documents": False, "return_len": True})
                    after = [before[r["index"]] for r in body["results"]]
                    if sorted(after) != sorted(before):
                        raise RuntimeError("rerank did not return every document exactly once")
                    changed += after != before
                    lines.append(f"{question!r}: {before} -> {after}")
                return True, f"order changed for {changed}/{len(QUESTIONS)} questions; " + "; ".join(lines), {}
            step(f"rerank ({rerank})", rerank_step)
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
