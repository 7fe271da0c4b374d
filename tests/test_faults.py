"""Faults, for real: kill -9 of a worker mid-request, server restarts, graceful drain, bounded queues."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from conftest import smollm_gguf_path, start_server, stop_server

# SmolLM2 keeps counting from here until max_tokens: a generation whose length we choose.
COUNTING = "1, 2, 3, 4, 5,"


@pytest.fixture
def home(tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


@pytest.fixture
def own_server(home):
    running = start_server(home)
    yield running
    stop_server(running.process)


def launch_gguf(server, uid: str, **extra) -> str:
    return server.launch(model_uid=uid, model_name=uid, model_type="LLM", model_path=smollm_gguf_path(), **extra)


def describe(server, uid: str) -> dict:
    return httpx.get(f"{server.url}/v1/models/{uid}").json()


def worker_pid(server, uid: str) -> int:
    return httpx.get(f"{describe(server, uid)['address']}/health").json()["pid"]


def wait_for_state(server, uid: str, wanted: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = describe(server, uid)
        if described["state"] in wanted:
            return described
        time.sleep(0.05)
    raise AssertionError(f"{uid} did not reach {wanted}: {describe(server, uid)}")


def server_log(server) -> str:
    return (server.home / "logs" / "server.log").read_text()


def complete(server, uid: str, max_tokens: int, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=timeout,
                      json={"model": uid, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0})


def metric_value(server, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in /metrics")


def test_kill_9_fails_the_request_fast_restarts_with_backoff_and_spares_other_models(own_server):
    server = own_server
    launch_gguf(server, "victim")
    launch_gguf(server, "bystander")
    victim_pid, bystander_pid = worker_pid(server, "victim"), worker_pid(server, "bystander")

    # A non-streamed request in flight when the worker is killed: 503 with the cause, at once.
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(response=complete(server, "victim", 4000)))
    sender.start()
    time.sleep(2.0)
    assert sender.is_alive(), "the generation must still be running when the worker is killed"
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    sender.join(timeout=60)
    answered_after = time.monotonic() - killed_at
    response = result["response"]
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "worker_unavailable" and "SIGKILL" in error["message"] and "retry" in error["message"]
    assert response.headers["retry-after"]
    # It failed when the worker died, not when the 4000-token generation would have ended.
    assert answered_after < 30

    # The other model is undisturbed: same process, still answering.
    assert complete(server, "bystander", 4).status_code == 200
    assert worker_pid(server, "bystander") == bystander_pid

    described = wait_for_state(server, "victim", {"ready"})
    assert "worker for victim was killed by SIGKILL" in server_log(server)
    assert "restart 1 in 0.5 s" in server_log(server)
    assert described["restarts"] == 1
    second_pid = worker_pid(server, "victim")
    assert second_pid != victim_pid
    assert complete(server, "victim", 4).status_code == 200

    # A stream cut by a kill ends with an error event naming the cause, then [DONE]; the next restart
    # waits twice as long (backoff).
    events = []
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"model": "victim", "prompt": COUNTING, "max_tokens": 4000, "temperature": 0,
                            "stream": True}) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:
                os.kill(second_pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "worker_unavailable" and "SIGKILL" in last["error"]["message"]
    deadline = time.monotonic() + 120
    while not ((described := describe(server, "victim"))["restarts"] == 2 and described["state"] == "ready"):
        assert time.monotonic() < deadline, described
        time.sleep(0.05)
    assert "restart 2 in 1.0 s" in server_log(server)
    assert described["restarts"] == 2
    assert worker_pid(server, "bystander") == bystander_pid

    assert metric_value(server, "ragserve_worker_restarts_total", model="victim") == 2
    assert metric_value(server, "ragserve_worker_restarts_total", model="bystander") == 0
    assert metric_value(server, "ragserve_requests_total", route="/v1/completions", model="victim",
                        status="503") >= 1


def test_restarted_server_relaunches_the_models_that_were_running(home):
    first = start_server(home)
    try:
        launch_gguf(first, "persisted")
    finally:
        stop_server(first.process)
    assert first.process.returncode == 0, "SIGTERM must stop the server cleanly"
    assert not psutil.pid_exists(first.process.pid)

    second = start_server(home)
    try:
        assert "persisted" in {m["id"] for m in httpx.get(f"{second.url}/v1/models").json()["data"]}
        wait_for_state(second, "persisted", {"ready"})
        assert complete(second, "persisted", 4).json()["usage"]["completion_tokens"] == 4
    finally:
        stop_server(second.process)


def test_graceful_shutdown_drains_a_request_in_flight(own_server):
    server = own_server
    launch_gguf(server, "drained")
    pid = worker_pid(server, "drained")
    events = []
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300,
                      json={"model": "drained", "prompt": COUNTING, "max_tokens": 12, "temperature": 0,
                            "stream": True}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    server.process.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(timeout=60) == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_stream_outliving_the_drain_ends_with_an_error_event_and_done(home):
    """SIGTERM's drain deadline (RAGSERVE_DRAIN_TIMEOUT) ends a stream still running with an OpenAI error event
    and [DONE], as the client reads every other error after the first byte; the connection is not just cut."""
    server = start_server(home, env={"RAGSERVE_DRAIN_TIMEOUT": "3"})
    try:
        launch_gguf(server, "long", n_ctx=4096)
        events, signalled = [], None
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                          json={"model": "long", "prompt": COUNTING, "max_tokens": 3500, "temperature": 0,
                                "stream": True}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if signalled is None:
                        signalled = time.monotonic()
                        server.process.send_signal(signal.SIGTERM)
        ended_after = time.monotonic() - signalled
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "server_shutting_down" and "RAGSERVE_DRAIN_TIMEOUT" in error["message"]
        assert 1.0 < ended_after < 15, ended_after
        assert server.process.wait(timeout=60) == 0
    finally:
        stop_server(server.process)


def test_full_worker_queue_answers_429_with_retry_after(own_server):
    server = own_server
    # One generation at a time, one more may wait (Xinference's `request_limits` sets the queue bound).
    launch_gguf(server, "narrow", n_parallel=1, request_limits=1)
    with ThreadPoolExecutor(max_workers=5) as pool:
        responses = list(pool.map(lambda _: complete(server, "narrow", 32), range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
    assert complete(server, "narrow", 2).status_code == 200  # the queue drained


def test_gateway_refuses_requests_beyond_its_in_flight_limit(home):
    server = start_server(home, env={"RAGSERVE_MAX_IN_FLIGHT": "1"})
    try:
        launch_gguf(server, "busy")
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                          json={"model": "busy", "prompt": COUNTING, "max_tokens": 4000, "temperature": 0,
                            "stream": True}) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # the stream is running: the one request the gateway takes
            refused = httpx.get(f"{server.url}/v1/models")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_overloaded"
            assert refused.headers["retry-after"] == "1"
            assert httpx.get(f"{server.url}/health").status_code == 200  # probes are never refused
        # The client hung up: its slot is freed (the gateway notices the disconnect and cancels the relay).
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/v1/models").status_code != 200:
            assert time.monotonic() < deadline, "the slot of a disconnected stream was not freed"
            time.sleep(0.1)
        assert complete(server, "busy", 2).status_code == 200
    finally:
        stop_server(server.process)
