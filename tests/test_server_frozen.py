"""A frozen worker (SIGSTOP) cannot hang requests, for real: the gateway-to-worker hop is bounded (first byte,
and between stream events), the liveness probe marks the worker and restarts it, and other requests then
succeed on the new worker."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager

import httpx
import pytest

from conftest import minilm_path, smollm_gguf_path, start_server, stop_server


def worker_pid(url: str, uid: str) -> int:
    address = httpx.get(f"{url}/v1/models/{uid}").json()["address"]
    return httpx.get(f"{address}/health").json()["pid"]


def wait_state(url: str, uid: str, wanted: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = httpx.get(f"{url}/v1/models/{uid}").json()
        if described["state"] in wanted:
            return described
        time.sleep(0.1)
    raise AssertionError(f"{uid} did not reach {wanted} within {timeout} s: {described}")


@contextmanager
def frozen(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:  # whatever happened, leave no stopped process behind
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@pytest.fixture
def home(tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def test_frozen_worker_gives_a_504_then_is_marked_killed_and_restarted(home):
    # First byte bounded at 2 s; the probe needs 4 misses of 1 s, so the 504 comes before the restart.
    running = start_server(home, env={"RAGSERVE_WORKER_FIRST_BYTE_TIMEOUT": "2", "RAGSERVE_WORKER_PROBE_INTERVAL": "1",
                                      "RAGSERVE_WORKER_PROBE_TIMEOUT": "1", "RAGSERVE_WORKER_PROBE_MISSES": "4"})
    url = running.url
    body = {"model": "frozen-embed", "input": ["a frozen worker"]}
    try:
        running.launch(model_uid="frozen-embed", model_name="frozen-embed", model_type="embedding",
                       model_path=minilm_path())
        old_pid = worker_pid(url, "frozen-embed")
        with frozen(old_pid):
            started = time.monotonic()
            answer = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
            took = time.monotonic() - started
            assert answer.status_code == 504, answer.text
            assert 1.5 < took < 8, took
            error = answer.json()["error"]
            assert error["code"] == "worker_unavailable" and answer.headers["Retry-After"]
            assert "'frozen-embed'" in error["message"] and "2 s" in error["message"]
            # The probe finds it: neither /health nor /v1/models says ready any more.
            marked = wait_state(url, "frozen-embed", {"restarting", "loading", "failed"}, timeout=15)
            assert "did not answer its health check" in marked["error"]
            assert httpx.get(f"{url}/health").json()["models"]["frozen-embed"] != "ready"
        ready = wait_state(url, "frozen-embed", {"ready"}, timeout=180)
        assert ready["restarts"] == 1
        new_pid = worker_pid(url, "frozen-embed")
        assert new_pid != old_pid
        again = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
        assert again.status_code == 200 and len(again.json()["data"][0]["embedding"]) == 384
        log = (home / "logs" / "server.log").read_text()
        assert f"(pid {old_pid}) did not answer its health check 4 times in a row" in log
    finally:
        stop_server(running.process)


def test_a_stream_from_a_frozen_worker_ends_with_an_error_event_after_the_idle_bound(home):
    # The probe is slowed down here so that only the stream's own bound can end the stream.
    running = start_server(home, env={"RAGSERVE_WORKER_STREAM_IDLE_TIMEOUT": "3",
                                      "RAGSERVE_WORKER_PROBE_INTERVAL": "600"})
    url = running.url
    try:
        running.launch(model_uid="frozen-chat", model_name="frozen-chat", model_type="LLM",
                       model_path=smollm_gguf_path(), n_ctx=1024)
        pid = worker_pid(url, "frozen-chat")
        request = {"model": "frozen-chat", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0}
        # A first call warms the engine up, so that the stream below is not cut before its first event.
        assert httpx.post(f"{url}/v1/completions", json={**request, "max_tokens": 4}, timeout=60).status_code == 200
        request["stream"] = True
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        break
            with frozen(pid):
                started = time.monotonic()
                events += [line[6:] for line in lines if line.startswith("data: ")]
                took = time.monotonic() - started
        assert 2.5 < took < 10, took
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "worker_unavailable"
        assert "'frozen-chat'" in error["message"] and "RAGSERVE_WORKER_STREAM_IDLE_TIMEOUT" in error["message"]
    finally:
        stop_server(running.process)
