"""Dynamic batching: concurrent callers get exactly their own results, and calls really merge.

The engine thread is held shut while the concurrent requests queue up, so merging is certain
without any timing assumption; every answer is compared with the same request sent alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn

from conftest import free_port, minilm_path
from ragserve.control.spec import ModelSpec, ModelState, ModelType
from ragserve.engines.base import EngineInputError
from ragserve.workers.batching import BatchSettings, DynamicBatcher, EngineCall, QueueTimeout
from ragserve.workers.worker import WorkerRuntime, create_worker_app

SENTENCES = [f"Sentence {i}: the {['cat', 'river', 'engine', 'market'][i % 4]} moved {i * 7 % 13} times today."
             for i in range(64)]


# ---- the batcher alone, on a recording engine stand-in ---------------------------------------

class Recorder:
    """Echoes each item with its key; fails on items starting with 'bad'. Blocks until opened."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list[str]]] = []
        self.gate = threading.Event()

    def __call__(self, key, items, should_stop):
        self.gate.wait(30)
        self.calls.append((key, list(items)))
        if any(item.startswith("bad") for item in items):
            raise EngineInputError(f"bad input in {items}")
        return EngineCall([f"{key}:{item}" for item in items], 10 * len(items))


def run_jobs(recorder: Recorder, jobs: list[tuple[object, list[str]]], settings: BatchSettings):
    async def main():
        batcher = DynamicBatcher(recorder, ThreadPoolExecutor(1), settings, item_tokens=lambda k, t: 1)
        tasks = [asyncio.create_task(batcher.submit(key, items)) for key, items in jobs]
        await asyncio.sleep(0.05)  # every job queued behind the closed gate
        recorder.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return results, batcher.stats

    return asyncio.run(main())


def test_batcher_merges_same_key_and_splits_results_back():
    recorder = Recorder()
    jobs = [("q" if i % 3 == 0 else "d", [f"t{i}-{j}" for j in range(1 + i % 3)]) for i in range(12)]
    results, stats = run_jobs(recorder, jobs, BatchSettings(max_batch_size=100, max_wait_s=0))
    for (key, items), result in zip(jobs, results):
        assert result.items == [f"{key}:{item}" for item in items]
    assert sum(r.prompt_tokens for r in results) == 10 * sum(len(items) for _, items in jobs)
    for key, items in recorder.calls:  # never a mixed-key call
        assert all(item.split("-")[0][1:].isdigit() for item in items)
        assert {jobs[int(item.split("-")[0][1:])][0] for item in items} == {key}
    assert stats.most_requests > 1 and stats.batches < len(jobs)


def test_batcher_respects_size_and_token_limits():
    recorder = Recorder()
    jobs = [("k", [f"t{i}a", f"t{i}b"]) for i in range(10)]
    results, _ = run_jobs(recorder, jobs, BatchSettings(max_batch_size=5, max_tokens=100, max_wait_s=0))
    assert [r.items for r in results] == [[f"k:t{i}a", f"k:t{i}b"] for i in range(10)]
    assert all(len(items) <= 5 for _, items in recorder.calls[1:])
    recorder = Recorder()
    results, _ = run_jobs(recorder, jobs, BatchSettings(max_batch_size=100, max_tokens=4, max_wait_s=0))
    assert all(len(items) <= 4 for _, items in recorder.calls)
    # One request larger than the limits runs alone and whole.
    recorder = Recorder()
    results, _ = run_jobs(recorder, [("k", [f"x{i}" for i in range(9)])], BatchSettings(max_batch_size=4))
    assert len(recorder.calls) == 1 and len(results[0].items) == 9


def test_one_bad_request_fails_alone():
    recorder = Recorder()
    jobs = [("k", ["good1"]), ("k", ["good2"]), ("k", ["bad3"]), ("k", ["good4", "good5"])]
    results, _ = run_jobs(recorder, jobs, BatchSettings(max_batch_size=100, max_wait_s=0))
    assert isinstance(results[2], EngineInputError)
    assert results[1].items == ["k:good2"] and results[3].items == ["k:good4", "k:good5"]
    assert results[0].items == ["k:good1"]


def test_closed_loop_clients_regroup_into_one_call():
    """Clients that started out of step must not stay split into two alternating half-size calls.

    8 clients start at once and 8 more while the first call runs; each client sends again 5 ms
    after its answer. Waiting only for as many callers as the previous call held keeps calls of 8
    forever; waiting for every caller seen during the previous call merges them into calls of 16.
    """
    calls: list[int] = []

    def engine(key, items, should_stop):
        calls.append(len(items))
        time.sleep(0.03)
        return EngineCall(list(items), len(items))

    async def main():
        batcher = DynamicBatcher(engine, ThreadPoolExecutor(1), BatchSettings(max_batch_size=64, max_wait_s=0.2),
                                 item_tokens=lambda k, t: 1)
        stop = time.monotonic() + 1.2

        async def client(name: str, start_after: float):
            await asyncio.sleep(start_after)
            while time.monotonic() < stop:
                assert (await batcher.submit("k", [name])).items == [name]
                await asyncio.sleep(0.005)

        await asyncio.gather(*[client(f"c{i}", 0 if i < 8 else 0.015) for i in range(16)])
        await batcher.close()

    asyncio.run(main())
    assert len(calls) >= 8, calls
    assert calls[-4:-1] == [16, 16, 16], calls  # the very last call may hold the stragglers only


def test_settings_from_options_and_env(monkeypatch):
    class Engine:
        max_batch_size = 48

    spec = ModelSpec(uid="u", model_name="u", model_type=ModelType.EMBEDDING, model_engine="x", model_path="/x")
    assert BatchSettings.for_engine(spec, Engine()).max_batch_size == 48
    monkeypatch.setenv("RAGSERVE_BATCH_WAIT_MS", "2")
    spec.options = {"batch_max_size": 8, "batch_max_tokens": "999"}
    settings = BatchSettings.for_engine(spec, Engine())
    assert (settings.max_batch_size, settings.max_tokens, settings.max_wait_s) == (8, 999, 0.002)


# ---- a real worker (real engine, real HTTP), in this process so its batcher can be read ------

class InProcessWorker:
    def __init__(self, spec: ModelSpec):
        self.runtime = WorkerRuntime(spec)
        self.runtime.load()
        assert self.runtime.state == ModelState.READY, self.runtime.error
        self.app = create_worker_app(self.runtime)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def post(self, route: str, **payload) -> dict:
        response = httpx.post(f"{self.url}{route}", json={"model": "m", **payload}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def concurrently_while_engine_held(self, route: str, payloads: list[dict]) -> list[dict]:
        """Send all payloads at once while the engine thread is held, so they must queue together."""
        gate = threading.Event()
        self.runtime.executor.submit(gate.wait, 60)

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [asyncio.create_task(client.post(f"{self.url}{route}", json={"model": "m", **p}))
                         for p in payloads]
                deadline = time.monotonic() + 60
                while self.runtime.waiting < len(payloads) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                gate.set()
                return await asyncio.gather(*tasks)

        try:
            responses = asyncio.run(main())
        finally:
            gate.set()
        for response in responses:
            assert response.status_code == 200, response.text
        return [r.json() for r in responses]

    def batch_stats(self) -> dict:
        return self.app.state.batcher.describe()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def embed_worker():
    spec = ModelSpec(uid="m", model_name="m", model_type=ModelType.EMBEDDING,
                     model_engine="sentence_transformers", model_path=minilm_path())
    worker = InProcessWorker(spec)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def rerank_worker(tmp_path_factory):
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("batching-cross-encoder")
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(folder))
    spec = ModelSpec(uid="m", model_name="m", model_type=ModelType.RERANK,
                     model_engine="sentence_transformers", model_path=str(folder))
    worker = InProcessWorker(spec)
    yield worker
    worker.close()


def embedding_payloads() -> list[dict]:
    payloads = []
    for i in range(40):
        texts = SENTENCES[i:i + 1 + i % 3]
        payload: dict = {"input": texts[0] if len(texts) == 1 else texts}
        if i % 5 == 0:
            payload["input_type"] = "query"
        if i % 7 == 0:
            payload["instruction"] = "Represent this sentence for retrieval: "
        if i % 11 == 0:
            payload["dimensions"] = 384
        payloads.append(payload)
    return payloads


def vectors(body: dict) -> np.ndarray:
    return np.asarray([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


def test_concurrent_embeddings_get_their_own_vectors(embed_worker):
    payloads = embedding_payloads()
    alone = [embed_worker.post("/v1/embeddings", **p) for p in payloads]
    before = embed_worker.batch_stats()
    together = embed_worker.concurrently_while_engine_held("/v1/embeddings", payloads)
    after = embed_worker.batch_stats()
    for payload, single, merged in zip(payloads, alone, together):
        assert vectors(merged).shape == vectors(single).shape
        np.testing.assert_allclose(vectors(merged), vectors(single), atol=1e-4)
    # Usage: each batch's engine count is shared out, so the totals agree exactly.
    assert sum(b["usage"]["prompt_tokens"] for b in together) == sum(b["usage"]["prompt_tokens"] for b in alone)
    assert after["most_requests_per_batch"] > 1
    assert after["batches"] - before["batches"] < len(payloads)
    # Instructions change the vectors, so they never share a call with plain texts.
    assert not np.allclose(vectors(alone[7])[0], vectors(embed_worker.post("/v1/embeddings",
                                                                        input=SENTENCES[7]))[0], atol=1e-3)


def test_base64_and_float_agree_under_batching(embed_worker):
    payloads = [{"input": SENTENCES[i], "encoding_format": "base64" if i % 2 else "float"} for i in range(16)]
    together = embed_worker.concurrently_while_engine_held("/v1/embeddings", payloads)
    import base64

    for i, body in enumerate(together):
        raw = body["data"][0]["embedding"]
        got = np.frombuffer(base64.b64decode(raw), dtype=np.float32) if i % 2 else np.asarray(raw)
        single = vectors(embed_worker.post("/v1/embeddings", input=SENTENCES[i]))[0]
        np.testing.assert_allclose(got, single, atol=1e-4)


def test_concurrent_reranks_get_their_own_scores(rerank_worker):
    queries = ["Where is Paris?", "How do rivers form?", "What moves markets?"]
    payloads = []
    for i in range(24):
        docs = [SENTENCES[(i * 5 + j) % len(SENTENCES)] for j in range(2 + i % 4)]
        payloads.append({"query": queries[i % 3], "documents": docs, "return_documents": True})
    alone = [rerank_worker.post("/v1/rerank", **p) for p in payloads]
    together = rerank_worker.concurrently_while_engine_held("/v1/rerank", payloads)
    for payload, single, merged in zip(payloads, alone, together):
        assert len(merged["results"]) == len(payload["documents"])
        by_index = {r["index"]: r for r in single["results"]}
        for result in merged["results"]:
            assert result["document"]["text"] == payload["documents"][result["index"]]
            assert result["relevance_score"] == pytest.approx(by_index[result["index"]]["relevance_score"],
                                                              abs=1e-5)
    stats = rerank_worker.batch_stats()
    assert stats["most_requests_per_batch"] > 1
    assert stats["batches"] < 2 * len(payloads)


# ---- through the gateway, with the OpenAI SDK ------------------------------------------------

def test_concurrent_sdk_clients_through_the_gateway(server):
    import openai

    uid = server.launch(model_name="minilm-batching", model_type="embedding", model_path=minilm_path())

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        alone = [await client.embeddings.create(model=uid, input=s) for s in SENTENCES[:32]]
        together = await asyncio.gather(*[client.embeddings.create(model=uid, input=s) for s in SENTENCES[:32]])
        await client.close()
        return alone, together

    alone, together = asyncio.run(main())
    for single, merged in zip(alone, together):
        np.testing.assert_allclose(merged.data[0].embedding, single.data[0].embedding, atol=1e-4)


# ---- callers who leave, callers who wait too long -------------------------------------------

class Stoppable:
    """Scores items one at a time, as the engines do, asking should_stop before each; blocks on a gate."""

    def __init__(self, per_item_s: float = 0.05) -> None:
        self.per_item_s = per_item_s
        self.gate = threading.Event()
        self.done: list[str] = []
        self.stopped = threading.Event()

    def __call__(self, key, items, should_stop):
        self.gate.wait(30)
        for item in items:
            if should_stop():
                self.stopped.set()
                raise EngineInputError("stopped")  # what an engine raises is never delivered: nobody waits
            time.sleep(self.per_item_s)
            self.done.append(item)
        return EngineCall(list(items), len(items))


def test_a_caller_who_leaves_the_queue_never_reaches_the_engine():
    engine = Stoppable(per_item_s=0)

    async def main():
        batcher = DynamicBatcher(engine, ThreadPoolExecutor(1), BatchSettings(max_batch_size=100, max_wait_s=0),
                                 item_tokens=lambda k, t: 1)
        running = asyncio.create_task(batcher.submit("a", ["a1"]))
        await asyncio.sleep(0.05)  # "a" is in the engine, held at the gate
        leaving = asyncio.create_task(batcher.submit("b", [f"b{i}" for i in range(10)]))
        staying = asyncio.create_task(batcher.submit("c", ["c1"]))
        await asyncio.sleep(0.05)
        leaving.cancel()
        await asyncio.sleep(0.01)
        engine.gate.set()
        results = await asyncio.gather(running, staying)
        await batcher.close()
        return [r.items for r in results]

    assert asyncio.run(main()) == [["a1"], ["c1"]]
    assert engine.done == ["a1", "c1"]


def test_a_running_call_stops_when_all_its_callers_left():
    engine = Stoppable()
    engine.gate.set()

    async def main():
        batcher = DynamicBatcher(engine, ThreadPoolExecutor(1), BatchSettings(max_batch_size=100, max_wait_s=0),
                                 item_tokens=lambda k, t: 1)
        first = asyncio.create_task(batcher.submit("k", [f"x{i}" for i in range(40)]))
        second = asyncio.create_task(batcher.submit("k", ["y"]))  # merged into the same call
        await asyncio.sleep(0.3)
        first.cancel()
        await asyncio.sleep(0.2)
        assert not engine.stopped.is_set(), "one caller of the call still waits"
        second.cancel()
        await asyncio.to_thread(engine.stopped.wait, 5)
        await batcher.close()

    asyncio.run(main())
    assert engine.stopped.is_set() and 0 < len(engine.done) < 41


def test_a_queued_caller_gets_queue_timeout_and_the_running_one_is_untouched():
    engine = Stoppable(per_item_s=0)

    async def main():
        batcher = DynamicBatcher(engine, ThreadPoolExecutor(1), BatchSettings(max_batch_size=100, max_wait_s=0),
                                 item_tokens=lambda k, t: 1, queue_timeout_s=0.2)
        running = asyncio.create_task(batcher.submit("a", ["a1"]))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(QueueTimeout) as raised:
            await batcher.submit("b", ["b1"])
        waited = time.monotonic() - started
        await asyncio.sleep(0.3)  # the running call is past its own deadline: it still answers
        engine.gate.set()
        result = await running
        await batcher.close()
        return waited, raised.value, result

    waited, error, result = asyncio.run(main())
    assert 0.15 < waited < 1 and error.waited_s >= 0.15
    assert result.items == ["a1"] and engine.done == ["a1"]
