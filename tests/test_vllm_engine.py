"""The vllm engine through the real server, against a stand-in vLLM (tests/fake_vllm).

vLLM needs CUDA, so the worker's child process here is `tests/fake_vllm`'s `vllm serve`: laid out
like the vllm package (metadata with the `vllm` console script, an alias-stub api_server), it
takes vLLM's CLI flags and answers vLLM's HTTP protocol by running real small models (SmolLM2
GGUF, MiniLM, a MiniLM cross-encoder, tiny Qwen3 folders). Every answer is checked against a
direct computation on the same weights, so the engine's command, payloads, parsing and Qwen3
prompt recipes are what is under test; vLLM's own numerics are not (scripts/check-vllm.sh checks
the command against the real vLLM parser).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import minilm_path, smollm_gguf_path, start_server, stop_server

pytest.importorskip("xllamacpp")
pytest.importorskip("sentence_transformers")

FAKE_VLLM = str(Path(__file__).parent / "fake_vllm")
QUESTION = "What is the capital of France? Answer in one word."
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "France is a country in Western Europe.",
    "Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("vllm-home")
    path = os.pathsep.join(p for p in (FAKE_VLLM, os.environ.get("PYTHONPATH")) if p)
    running = start_server(home, env={"PYTHONPATH": path})
    yield running
    stop_server(running.process)


def launch(server, **payload) -> str:
    response = httpx.post(f"{server.url}/v1/models", json={"model_engine": "vllm", **payload}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["model_uid"]


def describe(server, uid: str) -> dict:
    return httpx.get(f"{server.url}/v1/models/{uid}", timeout=30).json()


@pytest.fixture(scope="module")
def chat_uid(vllm_server):
    return launch(vllm_server, model_name="vllm-chat", model_type="LLM", model_path=smollm_gguf_path(), n_ctx=2048)


@pytest.fixture(scope="module")
def openai_client(vllm_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{vllm_server.url}/v1", api_key="none", timeout=120)


def test_chat_answers_and_stream_matches(vllm_server, chat_uid, openai_client):
    reply = openai_client.chat.completions.create(
        model=chat_uid, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens > 0

    pieces, finish, usage = [], None, None
    stream = openai_client.chat.completions.create(
        model=chat_uid, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert len(pieces) > 1, "the engine must stream pieces as vLLM sends them, not one block"
    assert finish == reply.choices[0].finish_reason
    assert usage.completion_tokens == reply.usage.completion_tokens

    # /v1/completions goes to vLLM's completions route with the prompt.
    completion = openai_client.completions.create(model=chat_uid, prompt="The capital of France is",
                                                  temperature=0, max_tokens=8)
    assert completion.choices[0].text.strip() and completion.usage.completion_tokens <= 8

    info = describe(vllm_server, chat_uid)["info"]
    assert info["engine"] == "vllm" and info["context_length"] == 2048  # from vLLM's /v1/models


def test_embeddings_equal_sentence_transformers(vllm_server, openai_client):
    from sentence_transformers import SentenceTransformer

    uid = launch(vllm_server, model_name="vllm-minilm", model_type="embedding", model_path=minilm_path())
    texts = ["The cat sits on the mat.", "Paris is in France.", "Quantum chromodynamics"]
    got = openai_client.embeddings.create(model=uid, input=texts)
    expected = SentenceTransformer(minilm_path(), device="cpu").encode(texts)
    assert [d.index for d in got.data] == [0, 1, 2]
    for item, vector in zip(got.data, expected):
        assert len(item.embedding) == len(vector) == 384
        assert max(abs(a - float(b)) for a, b in zip(item.embedding, vector)) <= 1e-5
    assert got.usage.prompt_tokens > 0


def test_rerank_equals_cross_encoder(vllm_server, tmp_path_factory):
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("minilm-cross"))
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(folder)
    uid = launch(vllm_server, model_name="vllm-cross", model_type="rerank", model_path=folder)
    response = httpx.post(f"{vllm_server.url}/v1/rerank", json={"model": uid, "query": QUERY, "documents": DOCUMENTS,
                                                                "return_documents": True}, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = CrossEncoder(folder, device="cpu").predict([(QUERY, d) for d in DOCUMENTS])
    assert [r["index"] for r in results] == sorted(range(len(DOCUMENTS)), key=lambda i: -float(expected[i]))
    for r in results:
        assert math.isclose(r["relevance_score"], float(expected[r["index"]]), abs_tol=1e-5)
        assert r["document"]["text"] == DOCUMENTS[r["index"]]


def test_qwen3_recipes_follow_the_model_cards(vllm_server, tmp_path_factory):
    """Qwen3-Embedding queries get the instruction and <|endoftext|>; Qwen3-Reranker is loaded with the
    hf_overrides and scored on the judging prompt: both equal the model-card reference."""
    pytest.importorskip("transformers")
    import qwen3_reference as ref
    from qwen3_models import ensure_models

    models = ensure_models(tmp_path_factory.getbasetemp())
    emb = launch(vllm_server, model_name="vllm-qwen3-emb", model_type="embedding", model_path=str(models["embedding"]))
    assert describe(vllm_server, emb)  # launched
    body = {"model": emb, "input": [QUERY]}
    query_vec = httpx.post(f"{vllm_server.url}/v1/embeddings", json={**body, "input_type": "query"}, timeout=120)
    doc_vec = httpx.post(f"{vllm_server.url}/v1/embeddings", json=body, timeout=120)
    assert query_vec.status_code == doc_vec.status_code == 200, query_vec.text + doc_vec.text
    ref.assert_close(query_vec.json()["data"][0]["embedding"], ref.embedding(models["embedding"], QUERY, query=True))
    ref.assert_close(doc_vec.json()["data"][0]["embedding"], ref.embedding(models["embedding"], QUERY))
    cut = httpx.post(f"{vllm_server.url}/v1/embeddings", json={**body, "dimensions": 16}, timeout=120)
    assert cut.status_code == 200, cut.text  # Matryoshka: Qwen3-Embedding supports `dimensions`
    ref.assert_close(cut.json()["data"][0]["embedding"], ref.cut(ref.embedding(models["embedding"], QUERY), 16))

    rr = launch(vllm_server, model_name="vllm-qwen3-rerank", model_type="rerank", model_path=str(models["reranker"]))
    response = httpx.post(f"{vllm_server.url}/v1/rerank", json={"model": rr, "query": QUERY, "documents": DOCUMENTS},
                          timeout=120)
    assert response.status_code == 200, response.text
    scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    ref.assert_close([scores[i] for i in range(len(DOCUMENTS))],
                     [ref.rerank_score(models["reranker"], QUERY, d) for d in DOCUMENTS])


def test_start_failure_reports_vllm_log_and_fix(vllm_server):
    # The stand-in's "GPU" holds a 65536-token KV cache; a longer context fails at start as on a real GPU.
    # force: ragserve's own memory plan (free memory of this busy machine) must not refuse it first.
    response = httpx.post(f"{vllm_server.url}/v1/models", timeout=300, json={
        "model_engine": "vllm", "model_name": "vllm-too-long", "model_type": "LLM",
        "model_path": smollm_gguf_path(), "n_ctx": 262144, "force": True})
    assert response.status_code >= 400, response.text
    message = response.json()["error"]["message"]
    assert "vLLM exited with code 1" in message
    assert "larger than the available KV cache memory" in message  # the child's own log tail
    assert "smaller --n-ctx" in message and "gpu_memory_utilization" in message  # the fix


def test_bad_flag_in_extra_args_fails_clearly(vllm_server):
    response = httpx.post(f"{vllm_server.url}/v1/models", timeout=300, json={
        "model_engine": "vllm", "model_name": "vllm-bad-flag", "model_type": "LLM",
        "model_path": smollm_gguf_path(), "options": {"extra_args": "--no-such-vllm-flag 1"}})
    assert response.status_code >= 400, response.text
    message = response.json()["error"]["message"]
    assert "unrecognized arguments: --no-such-vllm-flag" in message and "extra_args" in message


def test_vllm_crash_after_load_restarts_the_model(vllm_server, chat_uid, openai_client):
    pid = describe(vllm_server, chat_uid)["info"]["vllm_pid"]
    os.kill(pid, signal.SIGKILL)  # what a CUDA fault does to vLLM's server
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        info = describe(vllm_server, chat_uid)
        if info.get("state") == "ready" and info.get("info", {}).get("vllm_pid") not in (None, pid):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the model did not come back after vLLM died: {describe(vllm_server, chat_uid)}")
    reply = openai_client.chat.completions.create(
        model=chat_uid, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content


def test_flags_for_old_vllm_and_qwen3_reranker(tmp_path):
    """Flag building without a server: `--task` style for vLLM < 0.10, Qwen3-Reranker overrides."""
    import json

    from ragserve.control.spec import ModelSpec, ModelType
    from ragserve.engines import vllm_command

    folder = tmp_path / "Qwen3-Reranker-4B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    spec = ModelSpec(uid="rr", model_name="rr", model_type=ModelType.RERANK, model_engine="vllm",
                     model_path=str(folder), n_ctx=8192,
                     options={"gpu_memory_utilization": 0.4, "tensor_parallel_size": 2, "dtype": "bfloat16"})
    family = vllm_command.model_family(spec)
    assert family == "qwen3-reranker"
    old = vllm_command.serve_args(spec, port=1, style="task", family=family)
    new = vllm_command.serve_args(spec, port=1, style="runner", family=family)
    assert new[:2] == old[:2] == ["serve", str(folder)]  # `vllm serve MODEL`: the model is positional
    assert "--model" not in new and "--api-key" not in new  # the key goes in VLLM_API_KEY, not argv
    assert old[old.index("--task") + 1] == "score" and "--runner" not in old
    assert new[new.index("--runner") + 1] == "pooling" and "--task" not in new
    overrides = json.loads(new[new.index("--hf-overrides") + 1])
    assert overrides == vllm_command.QWEN3_RERANKER_HF_OVERRIDES
    assert new[new.index("--max-model-len") + 1] == "8192"
    assert new[new.index("--gpu-memory-utilization") + 1] == "0.4"
    assert new[new.index("--tensor-parallel-size") + 1] == "2"


def test_old_start_path_is_an_alias_stub_that_never_serves(tmp_path):
    """The fake lays out vLLM as current releases can: `python -m vllm.entrypoints.openai.api_server`
    (the engine's old start path) exits without binding its port; ragserve starts `vllm serve`."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (FAKE_VLLM, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                           smollm_gguf_path(), "--port", str(port)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "deprecated" in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_vllm_exiting_early_reports_command_and_its_last_log_lines(vllm_server, tmp_path):
    folder = tmp_path / "Unsupported-Arch"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}')
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    response = httpx.post(f"{vllm_server.url}/v1/models", timeout=300, json={
        "model_engine": "vllm", "model_name": "vllm-unsupported", "model_type": "LLM", "model_path": str(folder),
        "model_format": "safetensors"})
    assert response.status_code >= 400, response.text
    message = response.json()["error"]["message"]
    assert "vLLM exited with code 1" in message
    assert f"Command: vllm serve {folder} --served-model-name " in message  # what was run, to rerun by hand
    # vLLM's own last 20 lines: its error and the start-up lines just before it, not the whole log.
    assert "ValueError: Model architectures ['NoSuchForCausalLM'] are not supported for now" in message
    assert "start-up step 8 of 24" in message and "start-up step 7 of 24" not in message
    assert "--api-key" not in message and "VLLM_API_KEY" not in message


def test_api_key_reaches_vllm_by_environment_not_argv(vllm_server, chat_uid):
    pid = describe(vllm_server, chat_uid)["info"]["vllm_pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item)
    assert b"--api-key" not in argv  # argv is readable by every user of the machine (ps)
    key = environ[b"VLLM_API_KEY"].decode()
    assert key.encode() not in b" ".join(argv)
    port = int(argv[argv.index(b"--port") + 1])
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).status_code == 200


def test_reasoning_opened_by_the_chat_template_is_split(vllm_server, openai_client, tmp_path_factory):
    """A thinking model's template ends the prompt with <think>: the output ("hmm</think>Paris" from
    the tiny Qwen3's planted chain) starts inside reasoning, streamed and not, as on other engines."""
    import shutil

    pytest.importorskip("transformers")
    from qwen3_models import ensure_models

    models = ensure_models(tmp_path_factory.getbasetemp())
    folder = tmp_path_factory.mktemp("thinking") / "Qwen3-Tiny-Thinking"
    shutil.copytree(models["chat"], folder)
    template = (folder / "chat_template.jinja").read_text()
    opened = template.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>' }}")
    assert opened != template
    (folder / "chat_template.jinja").write_text(opened)
    uid = launch(vllm_server, model_name="vllm-thinking", model_type="LLM", model_path=str(folder),
                 model_format="safetensors")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = openai_client.chat.completions.create(model=uid, messages=messages, temperature=0, max_tokens=8)
    message = reply.choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == ("hmm", "Paris")

    reasoning, content = [], []
    for chunk in openai_client.chat.completions.create(model=uid, messages=messages, temperature=0, max_tokens=8,
                                                       stream=True):
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
    assert ("".join(reasoning), "".join(content)) == ("hmm", "Paris")


def test_missing_vllm_command_is_a_clear_error():
    """Without the vllm package's metadata there is no `vllm` command to start: say so before spawning."""
    import importlib.util

    from ragserve.engines import vllm_command
    from ragserve.engines.base import EngineError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("a vllm package is importable in this test process")
    with pytest.raises(EngineError, match=r"no `vllm` command .*pip install 'ragserve\[vllm\]'"):
        vllm_command.vllm_version()


def test_qwen3_long_document_is_cut_not_refused(vllm_server, tmp_path_factory):
    """vLLM answers a pair longer than max_model_len with a 400; the engine cuts the document's tail first
    (query and judging prompt whole), and the score equals the reference on the explicitly cut text."""
    pytest.importorskip("transformers")
    import qwen3_reference as ref
    from qwen3_models import ensure_models

    models = ensure_models(tmp_path_factory.getbasetemp())
    tokenizer = ref._tokenizer(str(models["reranker"]))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt_tokens = lambda doc: len(encode(ref.RERANK_PREFIX + f"<Instruct>: {ref.RERANK_INSTRUCTION}\n"  # noqa: E731
                                           f"<Query>: {QUERY}\n<Document>: {doc}" + ref.RERANK_SUFFIX))
    vocabulary = [w for w in "Paris France capital city river Seine Berlin Germany Tokyo Japan".split()
                  if len(encode(" " + w)) == 1]
    words = [vocabulary[i % len(vocabulary)] for i in range(5000)]  # ~5,000 tokens, one per word
    limit = 512
    assert prompt_tokens(" ".join(words)) > limit
    low, high = 0, len(words)  # the most leading words with which the whole prompt fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if prompt_tokens(" ".join(words[:middle])) <= limit else (low, middle - 1)
    short = "Paris is the capital of France."

    uid = launch(vllm_server, model_name="vllm-qwen3-rerank-512", model_type="rerank",
                 model_path=str(models["reranker"]), n_ctx=limit)
    response = httpx.post(f"{vllm_server.url}/v1/rerank", timeout=120,
                          json={"model": uid, "query": QUERY, "documents": [short, " ".join(words)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["meta"]["truncated_documents"] == 1, body["meta"]
    [log] = vllm_server.home.rglob(f"worker-{uid}.log")
    assert f"1 of 2 documents were too long for the context and were cut: each of their pairs now holds " \
           f"{limit} tokens at most" in log.read_text(errors="replace")
    scores = {r["index"]: r["relevance_score"] for r in body["results"]}
    ref.assert_close([scores[0], scores[1]], [ref.rerank_score(models["reranker"], QUERY, short),
                                              ref.rerank_score(models["reranker"], QUERY, " ".join(words[:low]))])

    too_long = httpx.post(f"{vllm_server.url}/v1/rerank", timeout=120,
                          json={"model": uid, "query": " ".join(words[:600]), "documents": [short]})
    assert too_long.status_code == 400, too_long.text
    assert "shorten the query" in too_long.json()["error"]["message"]


def test_cross_encoder_long_document_is_cut_not_refused(vllm_server, tmp_path_factory):
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("minilm-cross-long"))
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocabulary = [w for w in "paris france capital city river berlin germany tokyo japan".split()
                  if len(tokenizer.tokenize(w)) == 1]
    words = [vocabulary[i % len(vocabulary)] for i in range(5000)]
    limit = 256
    pair_tokens = lambda doc: len(tokenizer(QUERY, doc)["input_ids"])  # noqa: E731 - [CLS] q [SEP] d [SEP]
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if pair_tokens(" ".join(words[:middle])) <= limit else (low, middle - 1)

    uid = launch(vllm_server, model_name="vllm-cross-256", model_type="rerank", model_path=folder, n_ctx=limit)
    response = httpx.post(f"{vllm_server.url}/v1/rerank", timeout=120,
                          json={"model": uid, "query": QUERY, "documents": [DOCUMENTS[0], " ".join(words)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["meta"]["truncated_documents"] == 1, body["meta"]
    scores = {r["index"]: r["relevance_score"] for r in body["results"]}
    expected = CrossEncoder(folder, device="cpu").predict([(QUERY, DOCUMENTS[0]), (QUERY, " ".join(words[:low]))])
    for index in (0, 1):
        assert math.isclose(scores[index], float(expected[index]), abs_tol=1e-4)
