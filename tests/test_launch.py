"""Launching: engine choice, and every launch mistake a clear 4xx before any worker starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port, minilm_path, smollm_gguf_path


def launch(server, **payload) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models", json=payload, timeout=300)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert "error" in body and body["error"]["type"]
    return body["error"]["message"]


def test_wrong_path_is_a_400_naming_the_path(server):
    r = launch(server, model_name="nope", model_type="LLM", model_path="/no/such/model.gguf")
    assert r.status_code == 400
    assert "/no/such/model.gguf does not exist" in error_of(r)


def test_gguf_on_a_non_gguf_engine_is_refused(server):
    r = launch(server, model_name="bad-engine", model_type="embedding", model_engine="sentence_transformers",
               model_path=smollm_gguf_path())
    assert r.status_code == 400
    message = error_of(r)
    assert "cannot load gguf" in message and "llama.cpp" in message


def test_folder_on_llama_cpp_is_refused(server):
    r = launch(server, model_name="bad-engine2", model_type="embedding", model_engine="llama.cpp",
               model_path=minilm_path())
    assert r.status_code == 400
    assert ".gguf" in error_of(r)


def test_wrong_model_type_for_the_folder(server):
    r = launch(server, model_name="minilm-as-llm", model_type="LLM", model_path=minilm_path())
    assert r.status_code == 400
    assert "--model-type embedding" in error_of(r)


def test_missing_engine_extra_names_the_install(server):
    # vLLM needs a GPU and is not installed here: the error must say how to get it.
    r = launch(server, model_name="needs-vllm", model_type="embedding", model_engine="vllm",
               model_path=minilm_path())
    assert r.status_code == 400
    assert "pip install 'ragserve[vllm]'" in error_of(r)


def test_unknown_engine_and_type(server):
    r = launch(server, model_name="x", model_type="LLM", model_engine="tensorrt", model_path=smollm_gguf_path())
    assert r.status_code == 400 and "unknown model engine" in error_of(r)
    r = launch(server, model_name="x", model_type="image", model_path=smollm_gguf_path())
    assert r.status_code == 400 and "unknown model type" in error_of(r)


def test_corrupt_gguf_fails_with_the_workers_error_and_server_survives(server, tmp_path):
    broken = tmp_path / "broken.gguf"
    data = Path(smollm_gguf_path()).read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # a cut download
    r = launch(server, model_name="broken", model_type="LLM", model_path=str(broken))
    assert r.status_code == 500
    assert "broken" in error_of(r)
    listed = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert listed["broken"]["state"] == "failed" and listed["broken"]["error"]
    chat = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 503 and "failed" in error_of(chat)
    assert httpx.delete(f"{server.url}/v1/models/broken").status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_duplicate_uid_is_a_conflict(server):
    uid = "dup-smol"
    assert launch(server, model_name=uid, model_type="LLM", model_path=smollm_gguf_path()).status_code == 200
    try:
        again = launch(server, model_name=uid, model_type="LLM", model_path=smollm_gguf_path())
        assert again.status_code == 409 and "already" in error_of(again)
    finally:
        httpx.delete(f"{server.url}/v1/models/{uid}")


def test_gguf_folder_needs_a_quantization_choice(server, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    for quant in ("Q4_1", "Q8_0"):
        os.symlink(smollm_gguf_path(), folder / f"smol-{quant}.gguf")
    r = launch(server, model_name="ambiguous", model_type="LLM", model_path=str(folder))
    assert r.status_code == 400 and "--quantization" in error_of(r)
    ok = launch(server, model_name="picked", model_type="LLM", model_path=str(folder), quantization="Q8_0")
    assert ok.status_code == 200
    described = httpx.get(f"{server.url}/v1/models/picked").json()
    assert described["model_path"].endswith("smol-Q8_0.gguf")
    httpx.delete(f"{server.url}/v1/models/picked")


def run_cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragserve.cli.main", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_serve_detach_launch_list_terminate_stop(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    started = run_cli(home, "serve", "--detach", "--port", str(port))
    assert started.returncode == 0, started.stderr
    try:
        info = json.loads((home / "run" / "server.json").read_text())
        assert info["port"] == port and (home / "logs" / "server.log").exists()
        # The seed's flags, verbatim.
        launched = run_cli(home, "launch", "--model-name", "cli-smol", "--model-type", "LLM",
                           "--model-engine", "llama.cpp", "--model-path", smollm_gguf_path(),
                           "--size-in-billions", "0_135", "--n-ctx", "1024")
        assert launched.returncode == 0, launched.stderr
        assert "Model UID: cli-smol" in launched.stdout
        listed = run_cli(home, "list")
        assert "cli-smol" in listed.stdout and "ready" in listed.stdout
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "cli-smol", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}]})
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        bad = run_cli(home, "launch", "--model-name", "x", "--model-path", "/nowhere")
        assert bad.returncode == 1 and "does not exist" in bad.stderr
        assert run_cli(home, "terminate", "cli-smol").returncode == 0
        assert "cli-smol" not in run_cli(home, "list").stdout
        # Nothing was written outside the home.
        assert {p.name for p in home.iterdir()} <= {"models", "cache", "logs", "run"}
    finally:
        stopped = run_cli(home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not (home / "run" / "server.pid").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
