"""`ragserve serve` guards its home and its port, for real: one server per home, an immediate restart on the
same port, no keyless server on a non-loopback address, and keys that never show in process arguments."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import free_port, start_server, stop_server


def ragserve(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RAGSERVE_API_KEYS", "RAGSERVE_API_KEY")}
    return subprocess.run([sys.executable, "-m", "ragserve.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean, "COLUMNS": "400", **(env or {})})


def said(done: subprocess.CompletedProcess) -> str:
    return " ".join((done.stdout + done.stderr).split())


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.fixture
def home(tmp_path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def test_a_second_server_on_the_same_home_is_refused_and_the_first_stays_reachable(home):
    first = start_server(home)
    try:
        recorded = (home / "run" / "server.json").read_text()
        other_port = free_port()
        second = subprocess.Popen([sys.executable, "-m", "ragserve.cli.main", "serve", "--port", str(other_port),
                                   "--home", str(home)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, "COLUMNS": "400"}, start_new_session=True)
        try:
            output, _ = second.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            stop_server(second)
            pytest.fail("a second server started on a home that already has one")
        output = " ".join(output.split())
        assert second.returncode != 0
        assert f"pid {first.process.pid}" in output and first.url in output, output
        assert "one server per home" in output
        # It touched nothing: the first server's record is intact and nothing listens on the other port.
        assert (home / "run" / "server.json").read_text() == recorded
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{other_port}/health", timeout=2)
        listed = ragserve("list", "--home", str(home))
        assert listed.returncode == 0 and "no models are running" in said(listed), said(listed)
        stopped = ragserve("stop", "--home", str(home))
        assert stopped.returncode == 0 and f"pid {first.process.pid}" in said(stopped)
        first.process.wait(timeout=30)
    finally:
        stop_server(first.process)
    # Once the first is gone, the home takes a server again.
    again = start_server(home)
    stop_server(again.process)


def test_restart_on_the_same_port_works_right_after_a_stop(home):
    port = free_port()
    first = start_server(home, port=port)
    try:
        # The server closes this connection first, so its side stays in TIME_WAIT for a minute.
        httpx.get(f"{first.url}/health", headers={"Connection": "close"})
        time.sleep(0.2)
        waiting = [c for c in psutil.net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT]
        assert waiting, "the test needs a TIME_WAIT socket on the server's port"
        assert ragserve("stop", "--home", str(home)).returncode == 0
        first.process.wait(timeout=30)
    finally:
        stop_server(first.process)
    second = start_server(home, port=port)  # raises if serve refuses the port
    try:
        assert httpx.get(f"{second.url}/health").json()["status"] == "ok"
    finally:
        stop_server(second.process)


def test_a_non_loopback_address_without_a_key_is_refused_unless_allowed(home):
    refused = ragserve("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--home", str(home))
    text = said(refused)
    assert refused.returncode != 0
    assert "no API key" in text and "--api-key-file" in text and "RAGSERVE_API_KEYS" in text
    assert "--allow-no-key" in text
    assert not (home / "run" / "server.json").exists()
    # --allow-no-key passes that rule: this start then stops only at the port, held here by a listener.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        allowed = ragserve("serve", "--host", "0.0.0.0", "--port", str(held), "--allow-no-key", "--home", str(home))
    assert allowed.returncode != 0 and f"cannot bind 0.0.0.0:{held}" in said(allowed), said(allowed)


def test_a_key_file_others_can_read_is_refused(home, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k-open-to-all\n")
    keys.chmod(0o644)
    refused = ragserve("serve", "--port", str(free_port()), "--api-key-file", str(keys), "--home", str(home))
    assert refused.returncode != 0 and f"chmod 600 {keys}" in said(refused), said(refused)
    assert not (home / "run" / "server.json").exists()


def test_keys_from_a_file_are_required_and_never_in_the_detached_servers_arguments(home, tmp_path):
    key = "k-from-file-" + os.urandom(6).hex()
    keys = tmp_path / "keys"
    keys.write_text(f"# the server's keys\n{key}\n\n")
    keys.chmod(0o600)
    port = free_port()
    started = ragserve("serve", "--detach", "--port", str(port), "--api-key-file", str(keys), "--home", str(home))
    assert started.returncode == 0, said(started)
    try:
        pid = json.loads((home / "run" / "server.json").read_text())["pid"]
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert key not in cmdline(pid)
        assert "RAGSERVE_API_KEYS" not in said(started)
    finally:
        ragserve("stop", "--home", str(home))


def test_the_api_key_flag_still_works_and_warns_that_ps_shows_it(home):
    running = start_server(home, api_key="k-flag")
    try:
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        log = (home / "logs" / "server.log").read_text()
        assert "--api-key puts the key in the process arguments" in log and "--api-key-file" in log
    finally:
        stop_server(running.process)


def test_allowed_host_adds_a_host_name_the_loopback_server_answers(home):
    running = start_server(home, "--allowed-host", "rag.internal:9997", "--allowed-host", "docs.internal")
    try:
        for name in ("rag.internal", "docs.internal", "localhost"):
            assert httpx.get(f"{running.url}/v1/models", headers={"Host": name}).status_code == 200, name
        refused = httpx.get(f"{running.url}/v1/models", headers={"Host": "rebound.example"})
        assert refused.status_code == 421 and "--allowed-host" in refused.json()["error"]["message"]
    finally:
        stop_server(running.process)


@pytest.mark.parametrize("name, value", [("RAGSERVE_WORKER_FIRST_BYTE_TIMEOUT", "soon"),
                                         ("RAGSERVE_WORKER_STREAM_IDLE_TIMEOUT", "0"),
                                         ("RAGSERVE_WORKER_PROBE_MISSES", "1.5"),
                                         ("RAGSERVE_THREADS", "all")])
def test_a_bad_bound_in_the_environment_stops_serve_at_start_naming_it(home, name, value):
    done = ragserve("serve", "--port", str(free_port()), "--home", str(home), env={name: value})
    assert done.returncode != 0 and f"{name}={value!r}" in said(done), said(done)
    assert not (home / "run" / "server.json").exists()
