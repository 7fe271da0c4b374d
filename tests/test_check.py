"""`ragserve check` against a real server with the real small models: the rerank step tells the truth.

The only reranker that installs offline is the SmolLM2 chat model scored by the yes/no rule (what the
demo stack ships, flagged `demo_only`). On the check's three questions it ranks worse than MiniLM
retrieval; the test first measures that through the API itself, then expects the check to fail on it
(naming hits@1 and MRR), and to warn, not fail and not say "ok", when the model is flagged as a demo.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import minilm_path, smollm_gguf_path, start_server, stop_server

# The check's own knowledge base and questions are its fixed test data; the test reads them from the
# module rather than copying them, so both always judge the same passages.
from ragserve.control.e2e_check import KNOWLEDGE_BASE, QUESTIONS

RERANK = {"model_type": "rerank", "model_path": None, "n_ctx": 1024, "model_engine": "llama.cpp"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("check-home")
    server = start_server(home)
    try:
        server.launch(model_uid="chat", model_name="chat", model_type="LLM", model_path=smollm_gguf_path(),
                      n_ctx=2048)
        server.launch(model_uid="embed", model_name="embed", model_type="embedding", model_path=minilm_path())
        # exact: the check's calls and this test's own calls must score alike (fast batching may move close
        # scores by up to ~0.01 with the batch a document lands in, enough to swap two near-equal documents).
        for uid, options in (("rerank-plain", {"rerank_mode": "yes_no", "rerank_batching": "exact"}),
                             ("rerank-demo", {"rerank_mode": "yes_no", "demo_only": True})):
            server.launch(model_uid=uid, model_name=uid, **{**RERANK, "model_path": smollm_gguf_path()},
                          options=options)
        yield server
    finally:
        stop_server(server.process)


def answer_ranks(url: str, order: str) -> list[int]:
    """Rank (1 = first) of each question's answering passage, by MiniLM cosine or by the reranker."""
    if order == "retrieval":
        body = httpx.post(f"{url}/v1/embeddings", timeout=120,
                          json={"model": "embed", "input": KNOWLEDGE_BASE + [q for q, _ in QUESTIONS]}).json()
        vectors = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        docs, queries = vectors[: len(KNOWLEDGE_BASE)], vectors[len(KNOWLEDGE_BASE):]
        scores = [list(queries[i] @ docs.T) for i in range(len(QUESTIONS))]
    else:
        scores = []
        for question, _ in QUESTIONS:
            body = httpx.post(f"{url}/v1/rerank", timeout=120,
                              json={"model": "rerank-plain", "query": question, "documents": KNOWLEDGE_BASE}).json()
            by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
            scores.append([by_index[j] for j in range(len(KNOWLEDGE_BASE))])
    return [1 + sum(s > row[answer] for s in row) for row, (_q, answer) in zip(scores, QUESTIONS)]


def run_cli(url: str, rerank: str) -> subprocess.CompletedProcess:
    """`ragserve check` as a user runs it, wide enough that no table cell wraps."""
    return subprocess.run([sys.executable, "-m", "ragserve.cli.main", "check", "--endpoint", url, "--chat", "chat",
                           "--embedding", "embed", "--rerank", rerank], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "1000"})


def rerank_row(output: str) -> str:
    rows = [line for line in output.splitlines() if "rerank (" in line]
    assert rows, output
    return rows[0]


def test_reranker_that_lowers_hits_at_1_and_mrr_fails_the_check(stack):
    # What makes this a failing case, measured independently of the check: retrieval puts every answer
    # first, the reranker does not.
    retrieval, reranked = answer_ranks(stack.url, "retrieval"), answer_ranks(stack.url, "rerank")
    assert retrieval == [1] * len(QUESTIONS), retrieval
    assert any(rank > 1 for rank in reranked), reranked
    hits = sum(rank == 1 for rank in reranked)
    mrr = sum(1 / rank for rank in reranked) / len(reranked)

    result = run_cli(stack.url, "rerank-plain")
    assert result.returncode == 1, result.stdout
    row = rerank_row(result.stdout)
    assert "FAIL" in row and " ok " not in row
    assert f"hits@1 3/3 -> {hits}/3" in result.stdout and f"MRR 1.00 -> {mrr:.2f}" in result.stdout, result.stdout
    assert "1 step(s) failed" in result.stdout


def test_demo_reranker_warns_and_the_check_passes(stack):
    listed = {m["id"]: m for m in httpx.get(f"{stack.url}/v1/models").json()["data"]}
    assert listed["rerank-demo"]["options"]["demo_only"] is True  # the server says so to every client

    result = run_cli(stack.url, "rerank-demo")
    assert result.returncode == 0, result.stdout
    row = rerank_row(result.stdout)
    assert "WARN" in row and " ok " not in row and "FAIL" not in row
    assert "code-path demo reranker" in result.stdout and "hits@1" in result.stdout and "MRR" in result.stdout
    assert "all checks passed (1 warning" in result.stdout


def test_rerank_is_judged_on_both_figures():
    from ragserve.control.e2e_check import judge_rerank

    off = {"hits_at_1": 2 / 3, "mrr": 5 / 6}
    assert judge_rerank(off, dict(off), demo=False, baseline="retrieval")[:2] == (True, False)  # a tie passes
    ok, warning, detail = judge_rerank(off, {"hits_at_1": 2 / 3, "mrr": 0.75}, demo=False, baseline="retrieval")
    assert (ok, warning) == (False, False) and "lowers MRR" in detail and "MRR 0.83 -> 0.75" in detail
    ok, warning, detail = judge_rerank(off, {"hits_at_1": 1.0, "mrr": 1.0}, demo=True, baseline="retrieval")
    assert (ok, warning) == (True, True) and "not claimed" in detail  # a demo warns even when it helps
