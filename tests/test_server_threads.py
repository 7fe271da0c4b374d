"""CPU threads are planned per worker, for real: the cores this server may use are shared among the
launched models by weight (chat 2, embedding and rerank 1), an explicit `n_threads` wins, and each
worker is started with its share."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import minilm_path, start_server, stop_server
from ragserve.control.spec import ModelSpec, ModelType
from ragserve.control.threads import plan_threads


def spec(uid: str, model_type: ModelType, **options) -> ModelSpec:
    return ModelSpec(uid=uid, model_name=uid, model_type=model_type, model_engine="llama.cpp",
                     model_path="/m.gguf", model_format="gguf", options=options)


STACK = [spec("chat", ModelType.LLM), spec("embed", ModelType.EMBEDDING), spec("rerank", ModelType.RERANK)]


@pytest.mark.parametrize("cores, expected", [
    (16, {"chat": 8, "embed": 4, "rerank": 4}),  # 16 x 2/4, 16 x 1/4, 16 x 1/4
    (6, {"chat": 3, "embed": 1, "rerank": 1}),   # 6 x 1/4 = 1.5: rounded down, never above the cores
    (2, {"chat": 1, "embed": 1, "rerank": 1}),   # fewer cores than shares: one thread each, at least
])
def test_cores_are_shared_by_weight(cores, expected, monkeypatch):
    monkeypatch.delenv("RAGSERVE_THREADS", raising=False)
    assert plan_threads(STACK, cores=cores) == expected


def test_an_explicit_n_threads_wins_and_is_taken_out_of_the_shared_cores(monkeypatch):
    monkeypatch.delenv("RAGSERVE_THREADS", raising=False)
    stack = [spec("chat", ModelType.LLM, n_threads=6), *STACK[1:]]
    assert plan_threads(stack, cores=16) == {"chat": 6, "embed": 5, "rerank": 5}  # (16 - 6) / 2 each
    monkeypatch.setenv("RAGSERVE_THREADS", "3")  # the operator's count for every worker without its own
    assert plan_threads(stack, cores=16) == {"chat": 6, "embed": 3, "rerank": 3}


def test_a_bad_n_threads_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="n_threads"):
        plan_threads([spec("chat", ModelType.LLM, n_threads="many")], cores=4)


def worker_threads(server, uid: str) -> tuple[int, str]:
    described = httpx.get(f"{server.url}/v1/models/{uid}").json()
    pid = httpx.get(f"{described['address']}/health").json()["pid"]
    environ = dict(entry.split("=", 1) for entry in Path(f"/proc/{pid}/environ").read_text().split("\0") if entry)
    return described["info"]["cpu_threads"], environ["RAGSERVE_THREADS"]


def test_workers_start_with_their_share_of_the_servers_cores(fresh_server):
    cores = len(os.sched_getaffinity(0))
    first = fresh_server.launch(model_uid="th-one", model_name="th-one", model_type="embedding",
                                model_path=minilm_path())
    assert worker_threads(fresh_server, first) == (cores, str(cores))  # alone: every core
    second = fresh_server.launch(model_uid="th-two", model_name="th-two", model_type="embedding",
                                 model_path=minilm_path())
    assert worker_threads(fresh_server, second) == (max(1, cores // 2), str(max(1, cores // 2)))
    third = fresh_server.launch(model_uid="th-three", model_name="th-three", model_type="embedding",
                                model_path=minilm_path(), options={"n_threads": 1})
    assert worker_threads(fresh_server, third) == (1, "1")
    listed = subprocess.run([sys.executable, "-m", "ragserve.cli.main", "list", "--endpoint", fresh_server.url],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert "Threads" in listed.stdout
    rows = {line.split()[1]: line for line in listed.stdout.splitlines() if "th-" in line}
    assert rows["th-three"].split()[9] == "1", listed.stdout  # the Threads cell of `ragserve list`
    bad = httpx.post(f"{fresh_server.url}/v1/models", timeout=60, json={
        "model_uid": "th-bad", "model_name": "th-bad", "model_type": "embedding", "model_path": minilm_path(),
        "n_threads": "many"})
    assert bad.status_code == 400 and "n_threads" in bad.json()["error"]["message"], bad.text
    assert httpx.get(f"{fresh_server.url}/v1/models/th-bad").status_code == 404


def test_a_restarted_server_shares_the_cores_among_all_the_models_it_relaunches(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    cores = len(os.sched_getaffinity(0))
    first = start_server(home)
    try:
        for uid in ("re-one", "re-two"):
            first.launch(model_uid=uid, model_name=uid, model_type="embedding", model_path=minilm_path())
        assert worker_threads(first, "re-one")[0] == cores  # launched alone, before the second existed
    finally:
        stop_server(first.process)
    again = start_server(home)
    try:
        for uid in ("re-one", "re-two"):
            wait_ready(again, uid)
            assert worker_threads(again, uid) == (max(1, cores // 2), str(max(1, cores // 2)))
    finally:
        stop_server(again.process)


def wait_ready(server, uid: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{server.url}/v1/models/{uid}")
        if response.status_code == 200 and response.json()["state"] == "ready":
            return
        time.sleep(0.2)
    raise AssertionError(f"{uid} was not relaunched within {timeout} s")
