"""Secrets stay secret, for real: the server's keys and hub tokens are in no process's arguments and in no
worker's environment, and the home, its run/ and logs/ files are the user's alone, also in an older home."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx

from conftest import minilm_path, start_server, stop_server


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_reach_no_worker_and_no_process_arguments_and_the_home_is_private(tmp_path):
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    home.chmod(0o755)  # a home made before the rule, with a log others could read
    old_log = home / "logs" / "old.log"
    old_log.write_text("a request's error\n")
    old_log.chmod(0o644)
    key, hub_token = "k-secret-" + os.urandom(8).hex(), "hf_" + os.urandom(8).hex()
    running = start_server(home, env={"RAGSERVE_API_KEYS": key, "HF_TOKEN": hub_token})
    running.api_key = key
    try:
        running.launch(model_uid="sec-embed", model_name="sec-embed", model_type="embedding",
                       model_path=minilm_path())
        auth = {"Authorization": f"Bearer {key}"}
        address = httpx.get(f"{running.url}/v1/models/sec-embed", headers=auth).json()["address"]
        worker = httpx.get(f"{address}/health").json()["pid"]

        environ = Path(f"/proc/{worker}/environ").read_bytes()
        names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0")}
        assert b"RAGSERVE_WORKER_TOKEN" in names  # the environment read is the worker's, with its own token
        assert key.encode() not in environ and hub_token.encode() not in environ
        assert not names & {b"RAGSERVE_API_KEYS", b"RAGSERVE_API_KEY", b"HF_TOKEN"}
        for pid in (running.process.pid, worker):
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

        assert mode(home) == 0o700
        for folder in ("run", "logs"):
            assert mode(home / folder) == 0o700
            files = sorted(p.name for p in (home / folder).iterdir())
            assert files and all(mode(home / folder / name) == 0o600 for name in files), \
                {name: oct(mode(home / folder / name)) for name in files}
        assert {"server.json", "server.lock", "worker-sec-embed.json"} <= set(os.listdir(home / "run"))
        assert {"server.log", "worker-sec-embed.log", "old.log"} <= set(os.listdir(home / "logs"))
    finally:
        stop_server(running.process)
