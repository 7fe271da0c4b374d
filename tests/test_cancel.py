"""Work nobody waits for is dropped; queued requests have a deadline; a stream cut by shutdown says so.

A real worker process (the same command the supervisor runs) with the real SmolLM2 GGUF as a yes/no
reranker, and real clients that give up: a request abandoned while queued must never reach the engine,
and the next request must answer in its normal time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import free_port, minilm_path, smollm_gguf_path, start_server, stop_server
from ragserve.control.spec import ModelSpec, ModelType

QUERY = "Which animal is known for its black and white stripes?"
TOPICS = ["zebras on the savanna", "river deltas and sediment", "the history of printing presses",
          "volcanoes and lava flows", "honey bees and their hives", "glaciers in the Alps",
          "the rules of chess", "baking sourdough bread", "lighthouses on rocky coasts", "solar panels"]
DOCUMENTS = [f"Document {i} is about {TOPICS[i % len(TOPICS)]}, explained in plain words." for i in range(20)]
# A rerank worth abandoning: 160 short documents take the engine far longer than the bound the next
# request is held to, even with parallel slots and a shared prefix; each one alone is quick, so the
# documents already running when the client leaves finish soon.
MANY_DOCUMENTS = [f"{DOCUMENTS[i % 20]} (copy {i})" for i in range(160)]


def fresh_document() -> list[str]:
    """One document the engine has not seen: no cached prompt makes it look faster than it is."""
    fresh_document.count = getattr(fresh_document, "count", 0) + 1
    return [f"Note {fresh_document.count} {time.monotonic()}: zebras have black and white stripes."]


class WorkerProcess:
    """`python -m ragserve.workers.worker`, as the supervisor starts it (without the gateway's token)."""

    def __init__(self, folder: Path, spec: ModelSpec, env: dict | None = None):
        spec_file = folder / f"{spec.uid}.json"
        spec_file.write_text(json.dumps(spec.to_dict()))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = folder / f"{spec.uid}.log"
        environment = {k: v for k, v in os.environ.items() if k != "RAGSERVE_WORKER_TOKEN"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ragserve.workers.worker", "--spec-file", str(spec_file), "--port",
                 str(port)], stdout=log, stderr=subprocess.STDOUT, env={**environment, **(env or {})})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                state = httpx.get(f"{self.url}/health", timeout=2).json()["state"]
                if state == "ready":
                    return
                assert state != "failed", self.log.read_text()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("worker did not become ready: " + self.log.read_text())

    def post(self, route: str, timeout: float = 300, **payload) -> httpx.Response:
        return httpx.post(f"{self.url}{route}", json={"model": "m", **payload}, timeout=timeout)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def rerank_spec(**options) -> ModelSpec:
    return ModelSpec(uid="m", model_name="m", model_type=ModelType.RERANK, model_engine="llama.cpp",
                     model_path=smollm_gguf_path(), options=options)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    worker = WorkerProcess(tmp_path_factory.mktemp("cancel-rerank"), rerank_spec(), env={"RAGSERVE_THREADS": "1"})
    yield worker
    worker.stop()


def timed(call) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = call()
    return time.monotonic() - started, response


class Abandoned(threading.Thread):
    """A request from a client that gives up after `after_s` seconds (it closes its connection)."""

    def __init__(self, worker: WorkerProcess, route: str, after_s: float, **payload):
        super().__init__()
        self.call = lambda: worker.post(route, timeout=after_s, **payload)
        self.outcome: object = None

    def run(self) -> None:
        try:
            self.outcome = self.call()
        except httpx.ReadTimeout as exc:
            self.outcome = exc

    def wait(self) -> None:
        """Until the client has given up; a request answered before that proves nothing."""
        self.join()
        assert isinstance(self.outcome, httpx.ReadTimeout), getattr(self.outcome, "text", self.outcome)


def abandon(worker: WorkerProcess, route: str, after_s: float, **payload) -> Abandoned:
    thread = Abandoned(worker, route, after_s, **payload)
    thread.start()
    return thread


def test_rerank_abandoned_in_the_queue_never_reaches_the_engine(reranker):
    one = lambda: reranker.post("/v1/rerank", query=QUERY, documents=DOCUMENTS[:1])  # noqa: E731
    one()  # warm
    baseline, response = timed(one)
    assert response.status_code == 200, response.text
    items_before = reranker.health()["batching"]["items"]
    # A client that stays keeps the engine busy for a few seconds (another query: no merging)...
    busy_docs = DOCUMENTS[:max(3, int(4 / baseline) + 1)]
    busy = {}
    busy_thread = threading.Thread(target=lambda: busy.update(zip(("s", "r"), timed(
        lambda: reranker.post("/v1/rerank", query="What is sourdough?", documents=busy_docs)))))
    busy_thread.start()
    time.sleep(0.3)
    # ...while a 20-document rerank queues behind it and its client gives up after a second.
    gone = abandon(reranker, "/v1/rerank", 1.0, query=QUERY, documents=DOCUMENTS)
    gone.wait()
    elapsed, response = timed(one)
    busy_thread.join()
    assert response.status_code == 200 and busy["r"].status_code == 200
    # The engine saw the busy call and the small ones only: the 20 documents were dropped unread.
    assert reranker.health()["batching"]["items"] - items_before == len(busy_docs) + 1
    # At most the rest of the busy call (its query is new to the prompt cache, so not len x baseline), then ours.
    assert elapsed < busy["s"] + baseline * 3 + 2, (elapsed, busy["s"], baseline)


def within_running_documents(info: dict, baseline: float) -> float:
    """The wait allowed after an abandoned rerank: the documents already running in the engine's parallel
    slots finish (no new one starts), then ours runs; with margin for a loaded machine."""
    return (int(info.get("parallel") or 1) + 2) * baseline + 2


def test_rerank_abandoned_while_running_stops_at_the_next_document(reranker):
    """The issue's case: a client leaves a large rerank after a second; the next one-document rerank
    must answer in about its normal time, not after the abandoned documents."""
    one = lambda: reranker.post("/v1/rerank", query=QUERY, documents=fresh_document())  # noqa: E731
    one()  # warm
    baseline, response = timed(one)
    assert response.status_code == 200, response.text
    abandon(reranker, "/v1/rerank", 1.0, query="Where do bees live?", documents=MANY_DOCUMENTS).wait()
    elapsed, response = timed(one)
    assert response.status_code == 200, response.text
    assert elapsed < within_running_documents(reranker.health()["info"], baseline), (elapsed, baseline)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    spec = ModelSpec(uid="m", model_name="m", model_type=ModelType.EMBEDDING,
                     model_engine="sentence_transformers", model_path=minilm_path())
    worker = WorkerProcess(tmp_path_factory.mktemp("cancel-embed"), spec)
    yield worker
    worker.stop()


def test_embedding_batch_abandoned_while_running_stops(embedder):
    """The engine stops between its internal batches: the next request waits for one of them at most."""
    one = lambda: embedder.post("/v1/embeddings", input="a zebra on the savanna")  # noqa: E731
    one()  # warm
    baseline, response = timed(one)
    assert response.status_code == 200, response.text
    texts = [f"{DOCUMENTS[i % 20]} Number {i}. " * 3 for i in range(64 * 30)]
    batch, response = timed(lambda: embedder.post("/v1/embeddings", input=texts[:64]))
    assert response.status_code == 200, response.text
    abandon(embedder, "/v1/embeddings", 1.0, input=texts).wait()  # about 30 batches of work
    elapsed, response = timed(one)
    assert response.status_code == 200, response.text
    assert elapsed < 2 * batch + 3 * baseline + 2, (elapsed, batch, baseline)


def test_stream_cut_by_the_drain_deadline_ends_with_an_error_event_and_done(tmp_path):
    """SIGTERM lets requests finish for a few seconds; a stream still running then must end with an
    error event and [DONE] (the client can tell it from a finished answer), not a dropped connection."""
    spec = ModelSpec(uid="m", model_name="m", model_type=ModelType.LLM, model_engine="llama.cpp",
                     model_path=smollm_gguf_path(), n_ctx=4096)
    worker = WorkerProcess(tmp_path, spec)
    try:
        events: list[str] = []
        with httpx.stream("POST", f"{worker.url}/v1/completions", timeout=60,
                          json={"model": "m", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000, "temperature": 0,
                                "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3:
                    worker.process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                    break
            events += [line[6:] for line in lines if line.startswith("data: ")]
        ended_after = time.monotonic() - signalled
    finally:
        worker.stop()
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down" and "send the request again" in error["message"], error
    assert ended_after < 10, ended_after
    assert all("error" not in json.loads(e) for e in events[:-2])


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory):
    """A server whose requests may wait at most one second for their model (RAGSERVE_QUEUE_TIMEOUT)."""
    home = tmp_path_factory.mktemp("queue-timeout-home")
    running = start_server(home, env={"RAGSERVE_QUEUE_TIMEOUT": "1", "RAGSERVE_THREADS": "1"})
    yield running
    stop_server(running.process)


def check_queue_timeout(response: httpx.Response, waited: float) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_timeout"
    assert int(response.headers["retry-after"]) >= 1
    assert waited < 5, waited


def test_queued_rerank_gets_503_after_the_queue_deadline(impatient_server):
    server = impatient_server
    uid = server.launch(model_uid="busy-rerank", model_name="busy-rerank", model_type="rerank",
                        model_engine="llama.cpp", model_path=smollm_gguf_path())
    post = lambda docs, query=QUERY: httpx.post(f"{server.url}/v1/rerank", timeout=120,  # noqa: E731
                                               json={"model": uid, "query": query, "documents": docs})
    started = time.monotonic()
    assert post(DOCUMENTS[:1]).status_code == 200
    one_doc = time.monotonic() - started
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, DOCUMENTS[:max(2, int(4 / one_doc) + 1)], "Where do bees live?")
        time.sleep(0.5)
        waited, response = timed(lambda: post(DOCUMENTS[:1]))
        check_queue_timeout(response, waited)
        assert busy.result().status_code == 200  # the request in the engine is not affected


def test_queued_chat_gets_503_after_the_queue_deadline(impatient_server):
    server = impatient_server
    uid = server.launch(model_uid="busy-chat", model_name="busy-chat", model_type="LLM",
                        model_path=smollm_gguf_path(), n_parallel=1)
    body = {"model": uid, "prompt": "1, 2, 3, 4, 5,", "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={**body, "max_tokens": 400, "stream": True}) as holding:
        assert holding.status_code == 200
        lines = holding.iter_lines()  # kept: a dropped iterator closes the stream, which frees the slot
        next(lines)  # its slot is taken
        waited, response = timed(lambda: httpx.post(f"{server.url}/v1/completions", timeout=120,
                                                    json={**body, "max_tokens": 4}))
        check_queue_timeout(response, waited)
