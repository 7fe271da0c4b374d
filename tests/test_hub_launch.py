"""Launching a hub ID through the server: it pulls into the server's own home, then serves the model."""

from __future__ import annotations

import httpx
import pytest

from conftest import start_server, stop_server
from fakehub import FakeHub
from ragserve.hub import pull_model
from ragserve.settings import resolve_home
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


def test_launch_by_hub_id_of_a_hostile_listing_is_refused_and_writes_nothing_outside(tmp_path):
    """A keyless server pulls what any client names: a hostile mirror must not get files written outside."""
    payload = tmp_path / "payload" / "payload.txt"
    payload.parent.mkdir()
    payload.write_text("written by a hostile hub\n")
    home = tmp_path / "server-home"
    home.mkdir()
    # <home>/models/<source>/evil-mirror/model + five levels up = tmp_path, outside the home.
    names = ["../../../../../escaped-rel.txt", str(tmp_path / "escaped-abs.txt")]
    fake = FakeHub()
    fake.add_repo("evil-mirror/model", {"config.json": payload, names[0]: payload, "model.safetensors": payload})
    fake.add_repo("evil-mirror/absolute", {"config.json": payload, names[1]: payload})
    fake.start()
    env = {"HF_ENDPOINT": fake.url, "MODELSCOPE_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "0",
           "HOME": str(tmp_path / "user-home")}
    server = start_server(home, env=env)
    try:
        for source in ("huggingface", "modelscope"):
            for repo, name in (("evil-mirror/model", names[0]), ("evil-mirror/absolute", names[1])):
                answer = httpx.post(f"{server.url}/v1/models", timeout=120, json={
                    "model_name": f"evil-{source}", "model_type": "embedding", "model_path": repo,
                    "source": source})
                assert answer.status_code == 400, answer.text
                message = answer.json()["error"]["message"]
                assert repr(name) in message and repo in message and "unsafe" in message, message
        assert httpx.get(f"{server.url}/v1/models").json()["data"] == []
    finally:
        stop_server(server.process)
        fake.stop()
    assert sorted(p.name for p in tmp_path.rglob("*escaped*")) == []
    assert not any((home / "models").iterdir())
    fetched = [r.path for r in fake.requests if r.query.get("FilePath") or "/resolve/" in r.path or "escaped" in r.path]
    assert not fetched, f"files were downloaded before the refusal: {fetched}"


def test_launch_of_a_pulled_model_truncated_since_is_refused_with_the_fix(tmp_path, hub, monkeypatch):
    home = tmp_path / "server-home"
    home.mkdir()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    folder = pull_model(MINILM, resolve_home(home), source="huggingface", progress=False)
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(12_000_000)
    hub.stop()  # the hub is gone: a launch by ID may not fall back on the damaged copy either
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HOME": str(tmp_path / "user-home")}
    server = start_server(home, env=env)
    try:
        for model_path in (str(folder), "hf:" + MINILM):
            answer = httpx.post(f"{server.url}/v1/models", timeout=120, json={
                "model_name": "damaged", "model_type": "embedding", "model_path": model_path})
            assert answer.status_code == 400, answer.text
            message = answer.json()["error"]["message"]
            if model_path == str(folder):
                assert answer.json()["error"]["code"] == "invalid_launch"
                assert f"1 file truncated (model.safetensors: 12 of {full / 1e6:.0f} MB)" in message, message
                assert f"ragserve pull {MINILM} --source huggingface" in message, message
            else:
                assert "cannot reach" in message and "HF_ENDPOINT" in message, message
        assert httpx.get(f"{server.url}/v1/models").json()["data"] == []
    finally:
        stop_server(server.process)
