"""What a client gets from the gateway when a model's worker freezes: a 504 `worker_unavailable` naming the
model in the OpenAI error shape, or, once a stream has started, a final error event and `data: [DONE]`.

The worker is frozen for real (SIGSTOP); the gateway's worker-hop timeouts are shortened through their
environment variables so the test takes seconds, and the liveness probe is slowed so that it does not
restart the worker while the test looks."""

from __future__ import annotations

import json
import signal
import time

import httpx
import psutil
import pytest

from conftest import smollm_gguf_path, start_server, stop_server

UID = "frozen-chat"


@pytest.fixture(scope="module")
def frozen_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("frozen-home")
    running = start_server(home, env={"RAGSERVE_WORKER_FIRST_BYTE_TIMEOUT": "5",
                                      "RAGSERVE_WORKER_STREAM_IDLE_TIMEOUT": "5",
                                      "RAGSERVE_WORKER_PROBE_INTERVAL": "120"})
    running.launch(model_uid=UID, model_name=UID, model_type="LLM", model_path=smollm_gguf_path())
    yield running
    stop_server(running.process)


def worker_of(server) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if any(f"worker-{UID}.json" in part for part in child.cmdline()):
            return child
    raise AssertionError(f"no worker process for {UID}")


def chat(**extra) -> dict:
    return {"model": UID, "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
            "temperature": 0, **extra}


def answers_again(server) -> None:
    """Wait until the thawed worker has worked through what was sent while it was frozen."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(max_tokens=2), timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return
        time.sleep(1)


def assert_worker_unavailable(error: dict) -> None:
    assert error["code"] == "worker_unavailable" and UID in error["message"], error
    assert error["type"] == "service_unavailable"


def test_a_frozen_worker_gets_a_504_naming_the_model(frozen_server):
    answers_again(frozen_server)
    worker = worker_of(frozen_server)
    worker.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = httpx.post(f"{frozen_server.url}/v1/chat/completions", json=chat(max_tokens=4), timeout=30)
        assert r.status_code in (503, 504), r.text
        assert time.monotonic() - started < 20
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert_worker_unavailable(error)
        assert r.headers.get("retry-after")
        # A stream asked of a frozen worker is refused the same way, before its first byte.
        r = httpx.post(f"{frozen_server.url}/v1/chat/completions", json=chat(max_tokens=4, stream=True), timeout=30)
        assert r.status_code in (503, 504) and r.headers["content-type"].startswith("application/json"), r.text
        assert_worker_unavailable(r.json()["error"])
    finally:
        worker.send_signal(signal.SIGCONT)
    answers_again(frozen_server)


def test_a_stream_cut_by_a_frozen_worker_ends_with_an_error_event_and_done(frozen_server):
    answers_again(frozen_server)
    worker = worker_of(frozen_server)
    events = []
    try:
        with httpx.stream("POST", f"{frozen_server.url}/v1/chat/completions", timeout=30,
                          json=chat(max_tokens=200, stream=True)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 2:  # the stream has started: freeze its worker
                    worker.send_signal(signal.SIGSTOP)
    finally:
        worker.send_signal(signal.SIGCONT)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert set(final["error"]) >= {"message", "type", "param", "code"}  # the OpenAI error shape, in-band
    assert_worker_unavailable(final["error"])
    assert all("error" not in json.loads(event) for event in events[:-2])
    answers_again(frozen_server)
