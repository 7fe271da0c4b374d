"""The in-process reference: one engine, called directly, in a process of its own.

    python benchmarks/reference.py SPEC_FILE      (started by benchmarks/run.py)

It loads the engine exactly as a ragserve worker does (`ragserve.engines.load_engine`, then
`gc.freeze()`), with nothing else in the interpreter, so a reference figure is never slowed by the
other models or the benchmark's own clients. It reads one JSON command a line on stdin, runs it,
times it with its own clock and answers one JSON line on stdout:

    {"op": "embed", "texts": [...], "batch": 32}        -> {"value": sentences per second}
    {"op": "rerank", "query": "...", "documents": [...]} -> {"value": milliseconds}
    {"op": "chat", "prompt": "...", "max_tokens": 128}   -> {"value": [ttft ms, tokens/s, tokens]}
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def embed(engine: Any, texts: list[str], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        np.asarray(engine.embed(texts[i:i + batch]).vectors, dtype=np.float32)
    return len(texts) / (time.perf_counter() - started)


def rerank(engine: Any, query: str, documents: list[str]) -> float:
    started = time.perf_counter()
    engine.rerank(query, documents)
    return (time.perf_counter() - started) * 1000


def chat(engine: Any, prompt: str, max_tokens: int) -> list[float]:
    from ragserve.engines.base import GenerationRequest

    request = GenerationRequest(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                temperature=0)
    started = time.perf_counter()
    first = last = None
    pieces = 0
    tokens = None
    for delta in engine.generate(request):
        if delta.text:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces += 1
        if delta.completion_tokens is not None:
            tokens = delta.completion_tokens
    tokens = tokens or pieces
    rate = (tokens - 1) / (last - first) if first and last and last > first else float("nan")
    return [((first or started) - started) * 1000, rate, tokens]


def main() -> None:
    # Answers go to the original stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from ragserve.control.spec import ModelSpec
    from ragserve.engines import load_engine

    engine = load_engine(ModelSpec.from_dict(json.loads(Path(sys.argv[1]).read_text())))
    gc.collect()
    gc.freeze()
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "embed":
            value: Any = embed(engine, command["texts"], command["batch"])
        elif op == "rerank":
            value = rerank(engine, command["query"], command["documents"])
        elif op == "chat":
            value = chat(engine, command["prompt"], command["max_tokens"])
        else:
            raise SystemExit(f"unknown op {op!r}")
        print(json.dumps({"value": value}), file=answers, flush=True)
    engine.close()


if __name__ == "__main__":
    main()
