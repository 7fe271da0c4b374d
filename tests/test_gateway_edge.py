"""What the gateway checks before any route: both base-URL forms that RAGFlow and Dify build, bounded headers,
loopback host names, validated model names and integers, and log lines a client cannot forge.

Requests are shaped as the apps send them (RAGFlow's Xinference provider, nightly 2026-08: model list with
aiohttp and `Authorization: Bearer ` for an empty key, chat and embeddings through the OpenAI SDK, rerank
with requests; Dify's Xinference plugin: describe with requests and yarl)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urljoin

import aiohttp
import httpx
import openai
import psutil
import pytest
import requests
from yarl import URL

from conftest import ensure_model, minilm_path, start_server, stop_server

DOCUMENTS = ["Paris is the capital and largest city of France.", "Bananas are rich in potassium."]


@pytest.fixture(scope="module")
def rerank_uid(server, tmp_path_factory) -> str:
    """A real cross-encoder (MiniLM body, fresh one-logit head), as in test_clients.py."""
    from sentence_transformers import CrossEncoder

    folder = tmp_path_factory.mktemp("edge-cross-encoder")
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(folder))
    return ensure_model(server, "t-rerank", model_name="t-rerank", model_type="rerank", model_path=str(folder))


def base_urls(server) -> list[str]:
    """The Xinference base URL as users enter it: the server's root, and the OpenAI base URL the README gives."""
    return [server.url, f"{server.url}/v1"]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == code, error
    return error


# ---- both base-URL forms -----------------------------------------------------------------------

def ragflow_model_list(base_url: str, key: str = "") -> tuple[int, dict]:
    """rag/llm/model_meta.py Xinference: aiohttp GET base_url.rstrip("/") + "/v1/models", Bearer {key}."""
    async def get():
        async with aiohttp.ClientSession() as session:
            async with session.get(base_url.rstrip("/") + "/v1/models",
                                   headers={"Authorization": f"Bearer {key}"}) as resp:
                return resp.status, await resp.json()

    return asyncio.run(get())


def ragflow_rerank_url(base_url: str) -> str:
    """rag/llm/rerank_model.py XInferenceRerank.__init__."""
    if base_url.find("/v1") == -1:
        base_url = urljoin(base_url, "/v1/rerank")
    if base_url.find("/rerank") == -1:
        base_url = urljoin(base_url, "/v1/rerank")
    return base_url


def test_ragflow_lists_models_with_either_base_url_and_an_empty_key(server, embed_uid, chat_uid, rerank_uid):
    for base in base_urls(server):
        status, body = ragflow_model_list(base)
        assert status == 200, (base, body)
        listed = {m["id"]: m for m in body["data"]}
        assert {embed_uid, chat_uid, rerank_uid} <= set(listed), base
        assert listed[embed_uid]["model_type"] == "embedding" and listed[rerank_uid]["model_type"] == "rerank"
        assert listed[chat_uid]["context_length"] > 0


def test_every_route_answers_under_the_doubled_prefix(server, embed_uid, chat_uid, rerank_uid):
    for base in base_urls(server):
        # Clients that append /v1 to the base URL they are given, as Xinference's clients do.
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        reply = oai.chat.completions.create(model=chat_uid, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=4, temperature=0)
        assert reply.choices[0].message.content
        stream = oai.chat.completions.create(model=chat_uid, messages=[{"role": "user", "content": "Say hi."}],
                                             max_tokens=4, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert oai.completions.create(model=chat_uid, prompt="Once upon", max_tokens=3).choices[0].text
        vectors = oai.embeddings.create(model=embed_uid, input=["first text", "second text"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384

        for url in (ragflow_rerank_url(base), base.rstrip("/") + "/v1/rerank"):
            response = requests.post(url, headers={"Content-Type": "application/json", "accept": "application/json"},
                                     json={"model": rerank_uid, "query": "capital of France", "return_documents": "true",
                                           "return_len": "true", "documents": DOCUMENTS}, timeout=30)
            assert response.status_code == 200, (url, response.text)
            assert sorted(r["index"] for r in response.json()["results"]) == [0, 1]

        assert httpx.get(f"{base}/v1/models/{embed_uid}").json()["model_uid"] == embed_uid
        assert httpx.get(f"{base}/v1/cluster/auth").json() == {"auth": False}
        assert httpx.get(f"{base}/v1/models/{embed_uid}/progress").json()["progress"] == 1.0


def test_metrics_count_the_doubled_prefix_under_the_route(server, embed_uid):
    before = _route_count(server, "/v1/embeddings")
    r = httpx.post(f"{server.url}/v1/v1/embeddings", json={"model": embed_uid, "input": "hello"}, timeout=60)
    assert r.status_code == 200
    assert _route_count(server, "/v1/embeddings") == before + 1


def _route_count(server, route: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ragserve_requests_total{") and f'route="{route}"' in line
               and 'status="200"' in line)


def test_dify_reads_max_tokens_of_an_embedding_model(server, embed_uid, chat_uid):
    """Dify's Xinference helper: GET URL(server_url) / "v1" / "models" / uid, reading `max_tokens`."""
    declared = json.loads((Path(minilm_path()) / "sentence_bert_config.json").read_text())["max_seq_length"]
    for base in base_urls(server):
        session = requests.Session()
        described = session.get(str(URL(base) / "v1" / "models" / embed_uid), headers={}, timeout=10)
        assert described.status_code == 200, described.text
        body = described.json()
        assert body["model_type"] == "embedding" and body["model_ability"] == ["embed"]
        assert body["max_tokens"] == declared
    listed = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert listed[embed_uid]["max_tokens"] == declared
    assert "max_tokens" not in listed[chat_uid]  # Xinference tells it for embedding models only


# ---- loopback host names --------------------------------------------------------------------------

def test_loopback_server_answers_only_loopback_host_names(server, embed_uid):
    port = server.url.rsplit(":", 1)[1]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "rebind.attacker.test", "localhost.evil.example", "0.0.0.0"):
        for response in (httpx.get(f"{server.url}/v1/models", headers={"Host": host}),
                         httpx.get(f"{server.url}/health", headers={"Host": host}),
                         httpx.post(f"{server.url}/v1/embeddings", headers={"Host": host},
                                    json={"model": embed_uid, "input": "x"}),
                         httpx.delete(f"{server.url}/v1/models/no-such-model", headers={"Host": host})):
            error = assert_error(response, 421, "host_not_allowed")
            assert "--allowed-host" in error["message"] and "RAGSERVE_ALLOWED_HOSTS" in error["message"]


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """A loopback server with an allow-list and a key."""
    home = tmp_path_factory.mktemp("edge-guarded")
    running = start_server(home, env={"RAGSERVE_ALLOWED_HOSTS": "ragserve.lan, gateway.internal:9997",
                                      "RAGSERVE_API_KEYS": "edge-key"})
    yield running
    stop_server(running.process)


def test_allowed_hosts_extend_the_loopback_names(guarded_server):
    key = {"Authorization": "Bearer edge-key"}
    for host in ("ragserve.lan", "RAGSERVE.LAN:8080", "gateway.internal", "localhost"):
        r = httpx.get(f"{guarded_server.url}/v1/models", headers={"Host": host, **key})
        assert r.status_code == 200, (host, r.text)
    # The host check holds with keys too, and comes before the key check.
    assert_error(httpx.get(f"{guarded_server.url}/v1/models", headers={"Host": "other.lan", **key}), 421,
                 "host_not_allowed")
    assert_error(httpx.get(f"{guarded_server.url}/v1/models", headers={"Host": "other.lan"}), 421, "host_not_allowed")


def test_a_server_on_all_interfaces_answers_docker_host_names(tmp_path):
    """Docker containers reach a `--host 0.0.0.0` server as host.docker.internal: no loopback rule there."""
    running = start_server(tmp_path, "--host", "0.0.0.0", env={"RAGSERVE_API_KEYS": "docker-key"})
    try:
        port = running.url.rsplit(":", 1)[1]
        r = httpx.get(f"{running.url}/v1/models", headers={"Host": f"host.docker.internal:{port}",
                                                           "Authorization": "Bearer docker-key"})
        assert r.status_code == 200, r.text
    finally:
        stop_server(running.process)


# ---- bounded headers --------------------------------------------------------------------------------

def test_big_headers_get_431_before_the_key_check(guarded_server):
    one_big = httpx.get(f"{guarded_server.url}/v1/models", headers={"X-Big": "a" * (20 * 1024)})
    error = assert_error(one_big, 431, "request_header_too_large")
    assert "RAGSERVE_MAX_HEADER_KB" in error["message"]
    many = {f"X-Part-{i}": "b" * (15 * 1024) for i in range(5)}  # each under 16 KiB, 75 KiB in all
    assert_error(httpx.get(f"{guarded_server.url}/v1/models", headers=many), 431, "request_header_too_large")
    fine = {f"X-Part-{i}": "b" * 1024 for i in range(8)}
    assert httpx.get(f"{guarded_server.url}/v1/models",
                     headers={**fine, "Authorization": "Bearer edge-key"}).status_code == 200


def test_an_endless_header_is_cut_off_without_growing_the_gateway(server):
    gateway = psutil.Process(server.process.pid)
    host, port = server.url.removeprefix("http://").split(":")
    baseline = gateway.memory_info().rss
    peak, sent = baseline, 0
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    deadline = time.monotonic() + 20
    try:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        while sent < 64 * (1 << 20) and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent % (8 << 20) == 0:
                peak = max(peak, gateway.memory_info().rss)
        answer = b""
    except OSError:  # refused mid-head: the gateway closed the connection
        answer = None
    time.sleep(0.3)
    peak = max(peak, gateway.memory_info().rss)
    if answer is not None:
        try:
            answer = sock.recv(200)
        except OSError:
            answer = b""
    sock.close()
    assert sent < 64 * (1 << 20), "the gateway took a 64 MB header without refusing it"
    assert answer is None or answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer
    assert (peak - baseline) < 8 * (1 << 20), f"gateway RSS grew by {(peak - baseline) / 1e6:.1f} MB"
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- names and integers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["evil/name", "../escape", "a\x00b", "line\nbreak", "..", "-dash"])
def test_model_names_that_would_be_the_uid_are_validated(server, name):
    before = set(os.listdir(server.home / "logs")) | set(os.listdir(server.home / "run"))
    r = httpx.post(f"{server.url}/v1/models", json={"model_name": name, "model_type": "embedding",
                                                    "model_path": minilm_path()}, timeout=120)
    error = assert_error(r, 400, "invalid_request")
    assert error["param"] == "model_name" and "model_uid" in error["message"]
    listed = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert name not in listed
    assert set(os.listdir(server.home / "logs")) | set(os.listdir(server.home / "run")) == before


def test_a_model_name_with_control_characters_is_refused_even_with_a_uid(server):
    r = httpx.post(f"{server.url}/v1/models", json={"model_uid": "fine-uid", "model_name": "two\nlines",
                                                    "model_type": "embedding", "model_path": minilm_path()})
    assert assert_error(r, 400, "invalid_request")["param"] == "model_name"
    assert httpx.get(f"{server.url}/v1/models/fine-uid").status_code == 404


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "seed", 2**64),
    ("/v1/chat/completions", "seed", -(2**63) - 1),
    ("/v1/completions", "seed", 10**30),
    ("/v1/embeddings", "dimensions", 2**40),
    ("/v1/rerank", "top_n", 2**64),
    ("/v1/rerank", "max_chunks_per_doc", 2**64),
])
def test_integers_beyond_their_type_are_400s_naming_the_field(server, chat_uid, embed_uid, rerank_uid,
                                                              path, field, value):
    bodies = {"/v1/chat/completions": {"model": chat_uid, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 2},
              "/v1/completions": {"model": chat_uid, "prompt": "hi", "max_tokens": 2},
              "/v1/embeddings": {"model": embed_uid, "input": "hi"},
              "/v1/rerank": {"model": rerank_uid, "query": "q", "documents": ["d"]}}
    streams = (False, True) if "completions" in path else (False,)
    for stream in streams:  # a stream is refused before its first byte, with the same status
        body = {**bodies[path], field: value, **({"stream": True} if stream else {})}
        error = assert_error(httpx.post(f"{server.url}{path}", json=body, timeout=60), 400, "invalid_request")
        assert error["param"] == field and field in error["message"]
    assert httpx.post(f"{server.url}{path}", json=bodies[path], timeout=60).status_code == 200


def test_a_seed_at_the_int64_bounds_is_accepted(server, chat_uid):
    for seed in (2**63 - 1, -(2**63)):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": chat_uid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "seed": seed})
        assert r.status_code == 200, (seed, r.text)


def test_a_huge_context_size_is_refused_at_launch(server):
    r = httpx.post(f"{server.url}/v1/models", json={"model_name": "huge-ctx", "model_type": "embedding",
                                                    "model_path": minilm_path(), "n_ctx": 2**40})
    assert assert_error(r, 400, "invalid_request")["param"] == "n_ctx"
    assert httpx.get(f"{server.url}/v1/models/huge-ctx").status_code == 404


# ---- logs ------------------------------------------------------------------------------------------------

def test_an_encoded_newline_cannot_forge_a_log_line(server):
    forged = '127.0.0.1 - "GET /admin HTTP/1.1" 200'
    r = httpx.get(f"{server.url}/v1/models%0a127.0.0.1%20-%20%22GET%20/admin%20HTTP/1.1%22%20200")
    assert r.status_code == 404
    time.sleep(0.2)
    log_text = (server.home / "logs" / "server.log").read_text()
    lines = log_text.splitlines()
    assert not [line for line in lines if line.startswith(forged) or line.startswith("127.0.0.1 -")]
    assert "/v1/models\\n127.0.0.1" in log_text  # the request is still logged, escaped


def test_a_launch_that_fails_to_start_its_worker_leaves_no_record(server):
    """A real fault after the supervisor made the record: its worker log cannot be opened (a folder is in
    the way). The launch is a 500 naming the cause, and the uid is free again (no 409, no `loading`)."""
    uid = "no-log-file"
    blocker = server.home / "logs" / f"worker-{uid}.log"
    blocker.mkdir()
    try:
        for _ in range(2):  # the second attempt must meet the same fault, not a record left by the first
            r = httpx.post(f"{server.url}/v1/models", json={"model_uid": uid, "model_name": uid,
                                                            "model_type": "embedding", "model_path": minilm_path()},
                           timeout=120)
            assert r.status_code == 500, r.text
            assert httpx.get(f"{server.url}/v1/models/{uid}").status_code == 404
            assert uid not in [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
            error = assert_error(r, 500, "launch_failed")
            assert uid in error["message"] and "IsADirectoryError" in error["message"]
    finally:
        blocker.rmdir()
