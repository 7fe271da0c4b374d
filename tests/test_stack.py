"""`ragserve up -f` / `down` for real: the shipped demo stack on a free port, then the three models
answer; and a bad stack file fails with the line and field before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import free_port
from ragserve.control.stack import StackError, load_stack, parse_stack


def ragserve(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragserve.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def _kill_recorded_server(home: Path) -> None:
    try:
        pid = json.loads((home / "run" / "server.json").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)  # the detached server leads its own process group, workers included
    except (OSError, ValueError, KeyError):
        pass


def test_demo_stack_up_serves_chat_embeddings_rerank_then_down(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        up = ragserve("up", "-f", "demo", "--home", str(home), "--port", str(port))
        assert up.returncode == 0, up.stdout + up.stderr
        out = up.stdout
        for name in ("smollm2-chat", "minilm-embedding", "smollm2-rerank-demo"):
            assert name in out
        assert out.count("ready") >= 3
        assert f"http://127.0.0.1:{port}/v1" in out
        assert f"http://host.docker.internal:{port}/v1" in out
        assert "0.0.0.0" in out  # the demo binds loopback: the note says how to open it to Docker
        # No key: RAGFlow's OpenAI client refuses an empty field, so the settings ask for any text.
        assert "API key: any non-empty text, e.g. EMPTY" in " ".join(out.split())
        assert "leave empty" not in out
        state = json.loads((home / "run" / "stack-demo.json").read_text())
        assert state["started_server"] is True

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-chat", temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
        assert "Paris" in reply.choices[0].message.content
        vectors = [d.embedding for d in client.embeddings.create(
            model="minilm-embedding", input=["A cat sits on the mat.", "A kitten rests on a rug.",
                                             "Quarterly tax filing deadlines."]).data]
        a, b, c = (np.asarray(v) / np.linalg.norm(v) for v in vectors)
        assert len(vectors[0]) == 384 and a @ b > a @ c + 0.3
        rerank = httpx.post(f"{url}/v1/rerank", timeout=120, json={
            "model": "smollm2-rerank-demo", "query": "capital of France",
            "documents": ["Paris is the capital of France.", "Bananas are yellow."]}).json()
        scores = sorted(r["index"] for r in rerank["results"])
        assert scores == [0, 1] and all(0.0 <= r["relevance_score"] <= 1.0 for r in rerank["results"])

        again = ragserve("up", "-f", "demo", "--home", str(home), "--port", str(port))
        assert again.returncode == 0, again.stdout + again.stderr
        assert "kept as it is" in again.stdout  # ready models are not launched twice

        down = ragserve("down", "-f", "demo", "--home", str(home), "--port", str(port))
        assert down.returncode == 0, down.stdout + down.stderr
        assert "terminated smollm2-chat" in down.stdout and "stopped the server" in down.stdout
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        assert not (home / "run" / "stack-demo.json").exists()
    finally:
        _kill_recorded_server(home)


BAD_TYPE = """\
server:
  port: 9997
models:
  - name: chat
    type: chatbot
    path: builtin:smollm2-chat
  - name: embed
    type: embedding
    enigne: transformers
    path: builtin:minilm-embedding
"""


def test_bad_stack_file_names_line_field_and_fix(tmp_path):
    stack = tmp_path / "bad.yaml"
    stack.write_text(BAD_TYPE)
    home = tmp_path / "home"
    done = ragserve("up", "-f", str(stack), "--home", str(home), "--port", str(free_port()), timeout=120)
    assert done.returncode == 1
    err = done.stderr
    assert "line 5, models[0].type" in err and "unknown model type 'chatbot'" in err and "LLM" in err
    assert "line 9, models[1].enigne" in err and "unknown key 'enigne'" in err and "engine" in err
    assert not (home / "run" / "server.json").exists()  # nothing was started


@pytest.mark.parametrize("text, expected", [
    ("models:\n  - name: x\n    type: LLM\n", "line 2, models[0]: model 'x' says neither where its files are"),
    ("models:\n  - name: x\n    type: LLM\n    path: a.gguf\n  - name: x\n    type: embedding\n    path: b\n",
     "both named 'x'"),
    ("server:\n  port: 99999\nmodels:\n  - {name: x, type: LLM, path: a.gguf}\n", "line 2, server.port"),
    ("models:\n  - name: x\n     type: LLM\n", "not valid YAML at line 3"),
    ("models:\n  - {name: x, type: LLM, path: a.gguf, engine: tensorrt}\n", "unknown model engine 'tensorrt'"),
])
def test_stack_validation_messages(tmp_path, text, expected):
    with pytest.raises(StackError) as caught:
        parse_stack(text, tmp_path / "s.yaml")
    assert expected in str(caught.value)


def test_missing_local_path_is_reported_before_starting(tmp_path):
    stack = tmp_path / "s.yaml"
    stack.write_text(textwrap.dedent("""\
        models:
          - name: chat
            type: LLM
            path: ./models/not-there.gguf
        """))
    home = tmp_path / "home"
    done = ragserve("up", "-f", str(stack), "--home", str(home), "--port", str(free_port()), timeout=120)
    assert done.returncode == 1
    assert "s.yaml line 4, models[0].path (chat)" in done.stderr and "does not exist" in done.stderr
    assert not (home / "run" / "server.json").exists()


def test_shipped_stacks_load_by_name():
    demo = load_stack("demo")
    assert [m.name for m in demo.models] == ["smollm2-chat", "minilm-embedding", "smollm2-rerank-demo"]
    assert all(demo.local_path(m) is not None and demo.local_path(m).exists() for m in demo.models)
    seed = load_stack("qwen3-rag")
    assert [(m.name, m.engine) for m in seed.models] == [
        ("qwen3-14b-chat-local", "vllm"), ("qwen3-embedding-4b-local", "transformers"),
        ("qwen3-reranker-4b-local", "llama.cpp")]
    assert seed.hub_id(seed.models[0]) == "Qwen/Qwen3-14B"
    assert seed.models[2].quantization == "Q4_K_M"
    # The copy in the repo's stacks/ folder is the same file the package ships.
    repo_copy = Path(__file__).resolve().parents[1] / "stacks"
    for name in ("demo", "qwen3-rag"):
        assert (repo_copy / f"{name}.yaml").read_text() == load_stack(name).path.read_text()


def test_plan_of_the_seed_stack_refuses_14b_bf16_within_24_gib(tmp_path):
    done = ragserve("up", "-f", "qwen3-rag", "--plan", "--home", str(tmp_path / "home"),
                    env={"RAGSERVE_MEMORY_LIMIT_GB": "24"}, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "to pull: Qwen/Qwen3-14B" in out
    assert "not enough memory for 'qwen3-14b-chat-local'" in out
    assert "Q4_K_M" in out
    assert "CPU threads" in out and "CPU cores, shared by weight" in out


def test_up_generates_a_key_prints_it_and_down_uses_it(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    stack = tmp_path / "keyed.yaml"
    stack.write_text(textwrap.dedent(f"""\
        name: keyed
        server: {{host: 127.0.0.1, port: {port}}}
        models:
          - {{name: keyed-embed, type: embedding, path: "builtin:minilm-embedding", engine: sentence_transformers}}
        """))
    url = f"http://127.0.0.1:{port}"
    try:
        up = ragserve("up", "-f", str(stack), "--generate-key", "--home", str(home))
        assert up.returncode == 0, up.stdout + up.stderr
        out = " ".join(up.stdout.split())
        assert "API key: " in out and "generated by `ragserve up`" in out
        key = out.split("API key: ", 1)[1].split()[0]
        assert len(key) >= 32
        assert httpx.get(f"{url}/v1/models").status_code == 401
        listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert [m["id"] for m in listed.json()["data"]] == ["keyed-embed"]
        cores = len(os.sched_getaffinity(0))
        assert f"{cores} CPU threads" in out  # the stack's only model has every core
        server_pid = json.loads((home / "run" / "server.json").read_text())["pid"]
        assert key not in open(f"/proc/{server_pid}/cmdline").read()
        down = ragserve("down", "-f", str(stack), "--home", str(home))
        assert down.returncode == 0 and "terminated keyed-embed" in down.stdout, down.stdout + down.stderr
    finally:
        _kill_recorded_server(home)


def test_plan_with_an_estimate_that_cannot_be_made_says_why(tmp_path):
    done = ragserve("up", "-f", "demo", "--plan", "--home", str(tmp_path / "home"),
                    env={"RAGSERVE_MEMORY_LIMIT_GB": "abc"}, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "RAGSERVE_MEMORY_LIMIT_GB='abc'" in " ".join((done.stdout + done.stderr).split())
