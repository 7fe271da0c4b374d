"""Launching a hub ID through the server: it pulls into the server's own home, then serves the model."""

from __future__ import annotations

import httpx
import pytest

from conftest import start_server, stop_server
from fakehub import FakeHub
from test_hub_pull import MINILM, minilm_folder


@pytest.fixture
def hub():
    fake = FakeHub()
    fake.add_folder(MINILM, minilm_folder())
    fake.start()
    yield fake
    fake.stop()


def test_launch_with_a_hub_id_pulls_into_the_servers_home(tmp_path, hub):
    home = tmp_path / "server-home"
    home.mkdir()
    # HOME points elsewhere: with --home given, nothing may land in the default ~/.ragserve.
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "RAGSERVE_HUB": "huggingface",
           "HOME": str(tmp_path / "user-home")}
    server = start_server(home, env=env)
    try:
        launched = httpx.post(f"{server.url}/v1/models", timeout=300, json={
            "model_name": "pulled-minilm", "model_type": "embedding", "model_path": MINILM})
        assert launched.status_code == 200, launched.text
        described = httpx.get(f"{server.url}/v1/models/pulled-minilm").json()
        assert described["model_path"].startswith(str(home / "models"))
        assert any(r.path.endswith("model.safetensors") for r in hub.requests)
        body = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                          json={"model": "pulled-minilm", "input": "pulled from a hub"}).json()
        assert len(body["data"][0]["embedding"]) == 384
        assert not (tmp_path / "user-home" / ".ragserve").exists()

        unknown = httpx.post(f"{server.url}/v1/models", timeout=120, json={
            "model_name": "nope", "model_type": "embedding", "model_path": "no-such-org/no-such-model"})
        assert unknown.status_code == 400
        assert "no-such-org/no-such-model" in unknown.json()["error"]["message"]
    finally:
        stop_server(server.process)
