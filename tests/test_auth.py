"""API keys: Bearer on every route, several keys, 401 in the OpenAI shape, what stays open, real clients."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from conftest import smollm_gguf_path, start_server, stop_server

KEYS = ("alpha-key-0123456789", "beta-key-9876543210")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("auth-home")
    running = start_server(home, env={"RAGSERVE_API_KEYS": f" {KEYS[0]} ,{KEYS[1]},"})
    yield running
    stop_server(running.process)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_401(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == code
    assert "--api-key" in error["message"] or "RAGSERVE_API_KEYS" in error["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/rerank"),
    ("POST", "/v1/models"), ("DELETE", "/v1/models/x"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("GET", "/docs"), ("GET", "/no/such/route"),
])
def test_every_route_needs_a_key(keyed_server, method, path):
    # Checked before the body is read or validated: an invalid body still gets 401, not 400.
    assert_401(httpx.request(method, keyed_server.url + path, content=b"{not json"), "missing_api_key")
    assert_401(httpx.request(method, keyed_server.url + path, headers=bearer("wrong")), "invalid_api_key")


def test_each_configured_key_works_and_near_misses_do_not(keyed_server):
    for key in KEYS:
        assert httpx.get(f"{keyed_server.url}/v1/models", headers=bearer(key)).status_code == 200
    assert httpx.get(f"{keyed_server.url}/v1/models", headers={"X-API-Key": KEYS[1]}).status_code == 200
    assert httpx.get(f"{keyed_server.url}/v1/models", headers={"Authorization": f"bearer {KEYS[0]}"}).status_code == 200
    for near_miss in (KEYS[0][:-1], KEYS[0] + "x", KEYS[0].upper(), f"{KEYS[0]},{KEYS[1]}"):
        r = httpx.get(f"{keyed_server.url}/v1/models", headers=bearer(near_miss))
        assert r.status_code == 401, near_miss
    assert_401(httpx.get(f"{keyed_server.url}/v1/models", headers={"Authorization": "Bearer"}), "missing_api_key")
    # A key sent in another scheme is not a Bearer key.
    assert httpx.get(f"{keyed_server.url}/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}).status_code == 401


def test_health_is_open_but_tells_models_only_with_a_key(keyed_server):
    open_health = httpx.get(f"{keyed_server.url}/health")
    assert open_health.status_code == 200 and open_health.json()["status"] == "ok"
    assert "models" not in open_health.json()
    assert "models" in httpx.get(f"{keyed_server.url}/health", headers=bearer(KEYS[0])).json()


def test_openai_sdk_with_and_without_the_key(keyed_server):
    good = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEYS[1], max_retries=0)
    assert good.models.list().data == []
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"


def test_xinference_client_asks_whether_to_send_its_key(keyed_server, server):
    from xinference_client import RESTfulClient

    assert httpx.get(f"{keyed_server.url}/v1/cluster/auth").json() == {"auth": True}
    assert httpx.get(f"{server.url}/v1/cluster/auth").json() == {"auth": False}
    assert RESTfulClient(keyed_server.url, api_key=KEYS[0]).list_models() == {}
    with pytest.raises(RuntimeError, match="API key"):
        RESTfulClient(keyed_server.url, api_key="wrong").list_models()


def test_cli_sends_ragserve_api_key(keyed_server):
    def ragserve_list(env_key):
        env = {k: v for k, v in os.environ.items() if k != "RAGSERVE_API_KEY"}
        if env_key:
            env["RAGSERVE_API_KEY"] = env_key
        return subprocess.run([sys.executable, "-m", "ragserve.cli.main", "list", "--endpoint", keyed_server.url],
                              capture_output=True, text=True, env=env, timeout=60)

    assert ragserve_list(KEYS[0]).returncode == 0
    refused = ragserve_list(None)
    assert refused.returncode == 1 and "401" in refused.stderr + refused.stdout


def test_keyed_server_serves_a_model_and_its_worker_refuses_direct_calls(keyed_server):
    """With the key, the whole path works; the worker behind it answers only the gateway, so a local
    user cannot bypass the key by calling the worker's loopback port."""
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    keyed_server.api_key = KEYS[0]
    uid = keyed_server.launch(model_uid="auth-chat", model_name="auth-chat", model_type="LLM",
                              model_path=smollm_gguf_path())
    reply = client.chat.completions.create(model=uid, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    address = httpx.get(f"{keyed_server.url}/v1/models/{uid}", headers=bearer(KEYS[0])).json()["address"]
    assert httpx.get(f"{address}/health").status_code == 200  # readiness stays open
    direct = httpx.post(f"{address}/v1/chat/completions", timeout=30,
                        json={"model": uid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert direct.status_code == 403 and "gateway" in direct.json()["error"]["message"]


def test_open_server_warns_only_when_reachable_from_the_network(monkeypatch):
    from ragserve.cli.server_cmds import _open_to_network_warning

    monkeypatch.delenv("RAGSERVE_API_KEYS", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert _open_to_network_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert "--api-key" in _open_to_network_warning(host)
    monkeypatch.setenv("RAGSERVE_API_KEYS", "k1,k2")
    assert _open_to_network_warning("0.0.0.0") is None
